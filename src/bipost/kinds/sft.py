"""``sft``: supervised fine-tuning, the NLL of the response tokens (the prompt carries no loss)."""

from __future__ import annotations

from bipost.config import ObjectiveConfig
from bipost.kinds.base import Objective
from bipost.modeling.forward import positions
from bipost.objectives.segments import sequence_sft_loss


class SFT(Objective):
    """Unit: a response token (EOS included). Loss: ``objectives.sft`` on the chunked log-probs."""

    kind = "sft"
    config_class = ObjectiveConfig
    cli_name = "SFT"

    def loss(self, model, batch):
        pos = positions(batch, self.num_seqs(batch))
        logps = self.forward.token_logprobs(model, batch, pos)
        return sequence_sft_loss(logps, pos.seq, pos.num_seqs)

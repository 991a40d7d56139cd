"""Generation (bipost.generation): greedy and sampled decoding checked against hand-rolled loops
without a KV cache, generator-owned sampling (reproducible, resumable, global RNG untouched),
EOS / truncation, left padding, groups, wrappers (peft, DDP-like), and the model's mode."""

from __future__ import annotations

import copy

import pytest
import torch

from bipost.generation import Generations, generate, generation_model
from bipost.tiny import build_model

MAX_NEW = 10


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    m = build_model(tiny_tokenizer, hidden_size=32, num_layers=2, num_heads=2, seed=3)
    return m.eval()


@pytest.fixture(scope="module")
def prompts(tiny_tokenizer) -> list[list[int]]:
    texts = ["User: hello world 3?", "User: the cat", "User: what is the answer to the dog question 12?", "Human: yes"]
    return [tiny_tokenizer(t).input_ids for t in texts]


def ids_kw(tok) -> dict:
    return {"pad_id": tok.pad_token_id, "eos_id": tok.eos_token_id}


@torch.no_grad()
def hand_loop(model, prompt: list[int], eos: int, max_new: int, temperature: float = 0.0,
              generator: torch.Generator | None = None) -> list[int]:
    """Decoding by hand: the whole sequence through the model at every step (no cache), argmax or
    one multinomial draw from softmax(logits / T) with ``generator``; stop after EOS."""
    ids = list(prompt)
    out: list[int] = []
    for _ in range(max_new):
        logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].float()
        if temperature == 0:
            tok = int(logits.argmax())
        else:
            tok = int(torch.multinomial(torch.softmax(logits / temperature, -1)[None], 1, generator=generator))
        ids.append(tok)
        out.append(tok)
        if tok == eos:
            break
    return out


def derived_generator(generator: torch.Generator) -> torch.Generator:
    """The device generator ``generate`` seeds from the caller's (one draw per call)."""
    seed = int(torch.randint(0, 2**63 - 1, (1,), generator=generator))
    return torch.Generator().manual_seed(seed)


def test_greedy_equals_hand_rolled_argmax_without_cache(model, prompts, tiny_tokenizer):
    out = generate(model, prompts, max_new_tokens=MAX_NEW, **ids_kw(tiny_tokenizer))
    eos = tiny_tokenizer.eos_token_id
    assert out.completion_ids == [hand_loop(model, p, eos, MAX_NEW) for p in prompts]
    assert out.prompt_index == [0, 1, 2, 3] and isinstance(out, Generations)
    assert out.num_tokens == sum(len(c) for c in out.completion_ids) and out.tokens_per_second > 0


def test_left_padding_and_batch_size_do_not_change_greedy_output(model, prompts, tiny_tokenizer):
    """Prompts of 5-15 tokens left-padded in one batch, in batches of 3, and one by one."""
    kw = dict(max_new_tokens=MAX_NEW, **ids_kw(tiny_tokenizer))
    assert len({len(p) for p in prompts}) > 1
    one_by_one = [generate(model, [p], **kw).completion_ids[0] for p in prompts]
    assert generate(model, prompts, **kw).completion_ids == one_by_one
    assert generate(model, prompts, batch_size=3, **kw).completion_ids == one_by_one


def test_eos_stop_and_truncation_flags(model, prompts, tiny_tokenizer):
    """Declare as EOS the 3rd greedy token of prompt 0: its completion stops there (EOS included,
    not truncated); a prompt whose greedy output never contains that token runs to max_new_tokens
    and is truncated. Several EOS ids: the first one met ends the completion."""
    pad = tiny_tokenizer.pad_token_id
    free = generate(model, prompts, pad_id=pad, eos_id=tiny_tokenizer.eos_token_id, max_new_tokens=MAX_NEW)
    stop = free.completion_ids[0][2]
    assert stop not in free.completion_ids[0][:2]
    out = generate(model, prompts, pad_id=pad, eos_id=stop, max_new_tokens=MAX_NEW)
    assert out.completion_ids[0] == free.completion_ids[0][:3] and out.truncated[0] is False
    for full, got, cut in zip(free.completion_ids, out.completion_ids, out.truncated):
        if stop not in full:
            assert got == full and len(got) == MAX_NEW and cut is True
        else:
            assert got == full[: full.index(stop) + 1] and cut is False
    second = free.completion_ids[0][1]
    both = generate(model, prompts[:1], pad_id=pad, eos_id=[stop, second], max_new_tokens=MAX_NEW)
    assert both.completion_ids[0] == free.completion_ids[0][:2]


def test_sampling_equals_hand_rolled_multinomial_with_the_callers_generator(model, prompts, tiny_tokenizer):
    """One sequence at temperature 0.7: the tokens are exactly those of multinomial draws from
    softmax(logits / 0.7) with the generator seeded from one draw of the caller's generator."""
    g = torch.Generator().manual_seed(11)
    out = generate(model, prompts[1:2], max_new_tokens=MAX_NEW, temperature=0.7, generator=g, **ids_kw(tiny_tokenizer))
    ref = hand_loop(model, prompts[1], tiny_tokenizer.eos_token_id, MAX_NEW, 0.7,
                    derived_generator(torch.Generator().manual_seed(11)))
    assert out.completion_ids[0] == ref


def test_tiny_top_p_or_top_k_one_is_greedy(model, prompts, tiny_tokenizer):
    """top_p -> 0 keeps only the most likely token (HF's warper keeps at least one), as does top_k=1."""
    kw = dict(max_new_tokens=MAX_NEW, **ids_kw(tiny_tokenizer))
    greedy = generate(model, prompts, **kw).completion_ids
    g = torch.Generator().manual_seed(0)
    assert generate(model, prompts, temperature=1.0, top_p=1e-6, generator=g, **kw).completion_ids == greedy
    assert generate(model, prompts, temperature=1.0, top_k=1, generator=g, **kw).completion_ids == greedy


def test_generator_state_decides_the_samples_and_global_rng_is_untouched(model, prompts, tiny_tokenizer):
    kw = dict(max_new_tokens=MAX_NEW, temperature=1.0, num_generations=3, **ids_kw(tiny_tokenizer))
    torch.manual_seed(123)
    global_state = torch.get_rng_state()
    a = generate(model, prompts, generator=torch.Generator().manual_seed(5), **kw)
    assert torch.equal(torch.get_rng_state(), global_state), "generation consumed the global RNG"
    torch.manual_seed(999)  # a different global state changes nothing
    b = generate(model, prompts, generator=torch.Generator().manual_seed(5), **kw)
    c = generate(model, prompts, generator=torch.Generator().manual_seed(6), **kw)
    assert a.completion_ids == b.completion_ids
    assert a.completion_ids != c.completion_ids
    # groups: prompt-major, and samples of one prompt differ
    assert a.prompt_index == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert len({tuple(x) for x in a.completion_ids[:3]}) > 1


def test_resumed_generator_state_reproduces_the_continuation(model, prompts, tiny_tokenizer, tmp_path):
    """Two calls in a row; then the generator state after the first call, saved and loaded as a
    checkpoint would, reproduces the second call exactly."""
    kw = dict(max_new_tokens=MAX_NEW, temperature=1.0, num_generations=2, batch_size=4, **ids_kw(tiny_tokenizer))
    g = torch.Generator().manual_seed(42)
    generate(model, prompts, generator=g, **kw)
    torch.save(g.get_state(), tmp_path / "gen.pt")
    second = generate(model, prompts, generator=g, **kw)

    resumed = torch.Generator()
    resumed.set_state(torch.load(tmp_path / "gen.pt"))
    assert generate(model, prompts, generator=resumed, **kw).completion_ids == second.completion_ids


def test_greedy_groups_and_generator_untouched(model, prompts, tiny_tokenizer):
    g = torch.Generator().manual_seed(1)
    state = g.get_state()
    out = generate(model, prompts[:2], num_generations=2, generator=g, max_new_tokens=4, **ids_kw(tiny_tokenizer))
    assert torch.equal(g.get_state(), state)  # greedy draws nothing
    assert out.completion_ids[0] == out.completion_ids[1] and out.prompt_index == [0, 0, 1, 1]


def test_mode_restored_and_cache_used_even_if_config_disables_it(tiny_tokenizer, prompts):
    """A model in training mode with gradient checkpointing and config.use_cache=False: generation
    runs in eval mode with the KV cache (after the prompt, every forward sees one new token) and
    leaves each module's mode and the config as they were."""
    m = build_model(tiny_tokenizer, hidden_size=32, num_layers=2, num_heads=2, seed=3)
    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    m.config.use_cache = False
    m.train()
    m.model.layers[1].eval()  # a submodule in another mode keeps it
    lengths: list[int] = []
    hook = m.register_forward_pre_hook(lambda mod, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]),
                                       with_kwargs=True)
    out = generate(m, prompts[:2], max_new_tokens=5, **ids_kw(tiny_tokenizer))
    hook.remove()
    assert lengths[0] == max(len(p) for p in prompts[:2]) and set(lengths[1:]) == {1}
    assert m.training and m.model.layers[0].training and not m.model.layers[1].training
    assert m.config.use_cache is False
    ref = build_model(tiny_tokenizer, hidden_size=32, num_layers=2, num_heads=2, seed=3).eval()
    assert out.completion_ids == [hand_loop(ref, p, tiny_tokenizer.eos_token_id, 5) for p in prompts[:2]]


def test_model_generation_defaults_do_not_apply(model, prompts, tiny_tokenizer):
    """A generation_config.json asking for sampling, a repetition penalty and n-gram blocking does not
    change greedy output; one forcing a token (no neutral value) is an error."""
    m = copy.deepcopy(model)
    m.generation_config.update(do_sample=True, temperature=0.1, repetition_penalty=5.0, no_repeat_ngram_size=1,
                               min_length=30)
    kw = dict(max_new_tokens=MAX_NEW, **ids_kw(tiny_tokenizer))
    assert generate(m, prompts, **kw).completion_ids == generate(model, prompts, **kw).completion_ids
    m.generation_config.forced_bos_token_id = 0
    with pytest.raises(ValueError, match="generation_config sets forced_bos_token_id"):
        generate(m, prompts, **kw)


def test_peft_and_wrapped_models(model, prompts, tiny_tokenizer):
    """A LoRA model (adapters made non-zero) generates what its own forward decodes by hand; a
    DDP-like wrapper (``.module``) is unwrapped to the model, a peft wrapper is kept."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=MAX_NEW, **ids_kw(tiny_tokenizer))
    out = generate(peft_model, prompts, **kw)
    assert out.completion_ids == [hand_loop(peft_model, p, tiny_tokenizer.eos_token_id, MAX_NEW) for p in prompts]
    assert out.completion_ids != generate(model, prompts, **kw).completion_ids  # the adapters were active

    class Wrapper(torch.nn.Module):  # what DDP / DeepSpeed look like from outside
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert generation_model(Wrapper(peft_model)) is peft_model
    assert generate(Wrapper(model), prompts, **kw).completion_ids == generate(model, prompts, **kw).completion_ids


def test_argument_errors(model, prompts, tiny_tokenizer):
    kw = ids_kw(tiny_tokenizer)
    with pytest.raises(ValueError, match="needs a torch.Generator"):
        generate(model, prompts, max_new_tokens=2, temperature=1.0, **kw)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[1], []], max_new_tokens=2, **kw)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        generate(model, prompts, max_new_tokens=0, **kw)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        generate(model, prompts, max_new_tokens=2, top_p=0.0, **kw)


def test_synced_generation_under_fsdp2_on_two_ranks(model, prompts, tiny_tokenizer, tmp_path):
    """FSDP2 shards the model over 2 gloo ranks, so every forward is a collective. Rank 0's greedy
    completions end (at a chosen EOS) after 2 tokens, rank 1's run to max_new_tokens: with
    ``synced=True`` rank 0 keeps stepping until rank 1 is done (no deadlock), and each rank's
    completions equal the unsharded model's."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    model.save_pretrained(tmp_path / "model")
    pad = tiny_tokenizer.pad_token_id
    free = generate(model, prompts, pad_id=pad, eos_id=tiny_tokenizer.eos_token_id, max_new_tokens=MAX_NEW)
    stop = free.completion_ids[0][1]
    late = [p for p, c in zip(prompts, free.completion_ids) if stop not in c]
    assert late, "need a prompt whose greedy output never meets the chosen EOS"
    per_rank = [[prompts[0]], late[:2]]
    spec = {"prompts": per_rank, "eos": stop, "pad": pad, "max_new_tokens": MAX_NEW}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    worker = Path(__file__).with_name("gen_dist_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker),
           str(tmp_path / "model"), str(tmp_path / "spec.json"), str(tmp_path)]
    proc = subprocess.run(cmd, env=os.environ.copy(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    for rank, rank_prompts in enumerate(per_rank):
        got = json.loads((tmp_path / f"rank-{rank}.json").read_text())
        want = generate(model, rank_prompts, pad_id=pad, eos_id=stop, max_new_tokens=MAX_NEW)
        assert got["completion_ids"] == want.completion_ids and got["truncated"] == want.truncated
    assert json.loads((tmp_path / "rank-0.json").read_text())["truncated"] == [False]
    assert json.loads((tmp_path / "rank-1.json").read_text())["truncated"][0] is True

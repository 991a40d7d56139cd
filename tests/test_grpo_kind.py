"""The ``grpo`` objective kind (``bipost.kinds.grpo``): prompt data, one step worked through by hand,
its place in every schedule, exact resume, packing, failures, and 2 ranks = 1 rank.

The loss variants and advantages are checked by hand in ``test_grpo_loss.py``; generation in
``test_generation.py``; reward functions in ``test_rewards.py``. Here the runs use the workspace's
tiny model on "copy: a b c" prompts, 4 completions of at most 6 tokens per prompt, rewarded by exact
match with the answer and by ``helpers.letter_reward`` (dense, so a random model's groups differ).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from bipost.config import ConfigError, DataConfig
from bipost.data import DataError, collate_sft, load_objective_data
from bipost.data.prompts import PROMPTS, PromptExample, pack_groups
from bipost.data.types import SFTExample
from bipost.generation import generate
from bipost.objectives.grpo import group_advantages, grpo_loss
from bipost.rewards import RewardError
from bipost.run import build_trainer, train

from helpers import config, grpo_fields, letter_reward, workspace



def grpo_config(out: Path, *overrides: str, kinds: tuple[str, ...] = ("grpo",)):
    return config(out, "train.batch_size=4", "train.micro_batch_size=2", *overrides, kinds=kinds)


def rows(metrics: Path, kind: str = "train") -> list[dict]:
    return [r for r in map(json.loads, metrics.read_text().splitlines()) if r.get("kind", "train") == kind]


# ------------------------------------------------------------------------------ data
def test_prompt_rows_strings_conversations_and_input_output(tmp_path, tiny_tokenizer):
    """A string prompt is kept verbatim, a conversation is rendered with the chat template's
    generation prompt; every other column goes to the rewards; input_output rows take the template."""
    path = tmp_path / "p.jsonl"
    conv = [{"role": "user", "content": "hi"}]
    path.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "Q: 2+2?", "answer": "4", "level": 1},
        {"prompt": conv, "answer": "yo"},
        {"prompt": "", "answer": "x"},                                   # skipped: empty
        {"prompt": [{"role": "assistant", "content": "a"}], "answer": "y"},  # skipped: ends with the assistant
        {"prompt": "the cat sat on the mat " * 20, "answer": "z"},       # skipped: longer than max_len
    ]) + "\n")
    data = load_objective_data(DataConfig(path=str(path), max_len=16), PROMPTS, tiny_tokenizer, objective="grpo")
    assert data.summary.format == "prompt" and len(data.train) == 2
    assert dict(data.summary.skipped) == {"empty 'prompt'": 1, "too long": 1,
                                          "last turn of 'prompt' is the assistant's (a prompt ends with the user's)": 1}
    first, second = data.train[0], data.train[1]
    assert isinstance(first, PromptExample)
    assert list(first.prompt_ids) == tiny_tokenizer("Q: 2+2?")["input_ids"]  # with the tokenizer's BOS
    assert json.loads(first.prompt) == "Q: 2+2?" and json.loads(first.columns) == {"answer": "4", "level": 1}
    rendered = tiny_tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
    assert tiny_tokenizer.decode(second.prompt_ids, skip_special_tokens=False).endswith(rendered)
    assert json.loads(second.prompt) == conv
    batch = PROMPTS.collate([first, second], 0)
    assert batch["prompts"] == ["Q: 2+2?", conv] and batch["columns"][1] == {"answer": "yo"}

    io = tmp_path / "io.jsonl"
    io.write_text(json.dumps({"input": "copy: a b", "output": "a b"}) + "\n")
    ex = load_objective_data(DataConfig(path=str(io), max_len=64), PROMPTS, tiny_tokenizer).train[0]
    assert json.loads(ex.prompt) == "User: copy: a b\nAssistant: " and json.loads(ex.columns) == {"output": "a b"}

    missing = tmp_path / "m.jsonl"
    missing.write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(DataError, match="can't detect the data format"):
        load_objective_data(DataConfig(path=str(missing)), PROMPTS, tiny_tokenizer)
    with pytest.raises(DataError, match=r"row 0 \(line 1\): missing key 'prompt'"):
        load_objective_data(DataConfig(path=str(missing), format="prompt"), PROMPTS, tiny_tokenizer)


def test_config_errors_name_the_field(tmp_path):
    ws = workspace()
    base = [f"model.path={ws / 'model'}", "objectives.0.kind=grpo", f"objectives.0.data.path={ws / 'grpo.jsonl'}"]
    from bipost.configio import load_config

    cases = [([], r"objectives\.0\.rewards: give at least one reward function"),
             (grpo_fields(0) + ["objectives.0.num_generations=1"], r"objectives\.0\.num_generations must be >= 2"),
             (grpo_fields(0) + ["objectives.0.reference=x"], r"objectives\.0\.reference is only used with beta > 0"),
             (grpo_fields(0) + ["objectives.0.loss=ppo"], r"objectives\.0\.loss must be one of grpo, dapo, dr_grpo"),
             (grpo_fields(0) + ["objectives.0.completions_per_micro_batch=6"], "a multiple of num_generations"),
             (grpo_fields(0) + ["objectives.0.rewards.2.function=nothing"],
              r"objectives\.0\.rewards\.2: reward function 'nothing' is neither a built-in")]
    for extra, message in cases:
        with pytest.raises(ConfigError, match=message):
            load_config(overrides=base + extra)
    # the seed command line: --obj_N GRPO on input/output rows (the output column is the answer)
    from bipost.cli.train_bi_objective import config_from_argv

    seed = config_from_argv(["--pretrain", str(ws / "model"), "--obj_1", "SFT", "--dataset_1", str(ws / "sft.jsonl"),
                             "--obj_2", "grpo", "--dataset_2", str(ws / "copy.jsonl"), "--grpo_num_generations", "4",
                             "--save_path", str(tmp_path / "seed")])
    g = seed.objectives[1]
    assert type(g).__name__ == "GRPOConfig" and g.num_generations == 4 and g.data.format == "input_output"
    assert [(r.function, r.args) for r in g.rewards] == [("exact_match", {"column": "output"})]


def test_reference_only_with_beta_and_lora_reference_is_the_base(tmp_path):
    """beta = 0 loads and runs no reference; beta > 0 with LoRA uses the adapter-disabled policy (no
    second model): its KL to the policy is 0 at the start and grows as the adapter trains. The data
    selector refuses an online objective."""
    trainer = build_trainer(grpo_config(tmp_path / "a"))
    assert trainer.runs["grpo"].objective.reference is None
    lora = train(grpo_config(tmp_path / "b", "model.lora.rank=4", "objectives.0.beta=0.1", "optim.lr=1e-2"))
    kl = [r["grpo/kl"] for r in rows(tmp_path / "b" / "metrics.jsonl")]
    assert kl[0] == 0.0 and kl[-1] > 0
    assert lora.train_losses
    with pytest.raises(ConfigError, match="online grpo objective"):
        build_trainer(grpo_config(tmp_path / "c", "selector.enabled=true", "schedule.name=bilevel",
                                  kinds=("sft", "grpo")))


# ------------------------------------------------------------------------------ one step by hand
@pytest.mark.filterwarnings("ignore:Detected call of")
def test_one_step_by_hand(tmp_path):
    """One grpo step, recomputed outside the loop from the objective's own generator:

    * the step draws one seed per micro-batch (2 here); micro-batch j samples with seed j, i.e.
      ``generate(..., generator=Generator().manual_seed(seeds[j]))`` gives its completions;
    * rewards r = exact_match + 0.5 * letter_reward; advantages (r - mean_g) / (std_g + 1e-4) per
      group of 4 (``group_advantages``);
    * the logged loss is -mean(r) over the step's 16 completions, and the gradient is the
      ``grpo_loss`` gradient (loss grpo: mean over completions of each one's token mean of
      -A * d logp, the ratio being 1) summed over both micro-batches / 16 completions.
    """
    cfg = grpo_config(tmp_path / "run", "train.max_steps=1", "optim.max_grad_norm=0")
    trainer = build_trainer(cfg)
    run = trainer.runs["grpo"]
    objective, tok = run.objective, trainer.tokenizer
    drawn = [run.stream.batch(0), run.stream.batch(1)]
    gen_state = objective.generator.get_state()
    seeds = torch.randint(0, 2**62, (2,), generator=torch.Generator().set_state(gen_state)).tolist()
    model = trainer.model
    rewards = []
    params = [p for p in model.parameters() if p.requires_grad]
    from bipost.evaluation.generations import eos_ids
    from bipost.modeling.forward import Forward, positions

    for j, b in enumerate(drawn):
        gen = generate(model, b["prompt_ids"], pad_id=tok.pad_token_id, eos_id=eos_ids(tok, model), max_new_tokens=6,
                       temperature=1.0, num_generations=4, generator=torch.Generator().manual_seed(seeds[j]))
        texts = [tok.decode(c, skip_special_tokens=True) for c in gen.completion_ids]
        answers = [b["columns"][i]["answer"] for i in gen.prompt_index]
        r = torch.tensor([float(" ".join(t.split()) == a) + 0.5 * f
                          for t, a, f in zip(texts, answers, letter_reward(None, texts))])
        rewards.append(r)
        adv = group_advantages(r, 4).advantages
        batch = collate_sft(
            [SFTExample(0, tuple(b["prompt_ids"][i]), tuple(c)) for i, c in zip(gen.prompt_index, gen.completion_ids)],
            tok.pad_token_id)
        pos = positions(batch, 8)
        out = grpo_loss(Forward().token_logprobs(model, batch, pos), pos.seq, 8, adv)
        (out.losses.sum() / 16).backward()
    expected_grad = [p.grad.clone() for p in params]
    model.zero_grad(set_to_none=True)

    captured = {}
    real_step = trainer.optimizer.step
    trainer.optimizer.step = lambda *a, **k: captured.setdefault("g", [p.grad.clone() for p in params])
    rec = trainer.train_step(0)
    trainer.optimizer.step = real_step
    all_r = torch.cat(rewards)
    assert rec["loss/grpo"] == pytest.approx(-float(all_r.mean()), abs=1e-6)
    assert rec["grpo/reward"] == pytest.approx(float(all_r.mean()), abs=1e-6)
    assert float(all_r.std()) > 0  # the groups carry a signal
    for g, e in zip(captured["g"], expected_grad):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-7)


def test_packed_groups_equal_padded():
    """A packed row lays each prompt out once for its group; its completions' log-probs are the
    padded batch's (prompt lengths 3 and 2, groups of 3, completions of 1-3 tokens)."""
    from bipost.modeling.attention import use_packed_attention
    from bipost.modeling.forward import Forward, positions
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(workspace() / "model", attn_implementation="sdpa")
    use_packed_attention(model)
    exs = [SFTExample(0, (1, 5, 6), (7,)), SFTExample(0, (1, 5, 6), (8, 9)), SFTExample(0, (1, 5, 6), (10, 11, 2)),
           SFTExample(1, (1, 12), (13, 14)), SFTExample(1, (1, 12), (2,)), SFTExample(1, (1, 12), (15, 16, 17))]
    packed, padded = pack_groups(exs, 3), collate_sft(exs, 0)
    assert packed["input_ids"].shape[1] == 3 + 1 + 2 + 3 + 2 + 2 + 1 + 3  # each prompt once
    f = Forward()
    a = f.token_logprobs(model, packed, positions(packed, 6))
    b = f.token_logprobs(model, padded, positions(padded, 6))
    assert torch.equal(positions(packed, 6).seq, positions(padded, 6).seq)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ in the loop
def test_alright_with_lambda_one_is_grpo_alone(tmp_path):
    """ALRIGHT over (GRPO, SFT) with lambda = (1, 0) draws GRPO every step: the same samples (the
    objective's own generator), losses, metrics and final weights as GRPO alone."""
    alone = train(grpo_config(tmp_path / "alone", "train.max_steps=3"))
    both = train(grpo_config(tmp_path / "alright", "train.max_steps=3", "schedule.name=alright",
                             "objectives.0.weight=1", "objectives.1.weight=0", kinds=("grpo", "sft")))
    assert [r["ran"] for r in both.train_losses] == [["grpo"]] * 3
    assert both.train_losses == alone.train_losses
    keys = [k for k in rows(tmp_path / "alone" / "metrics.jsonl")[0] if k.startswith("grpo/")]
    assert "grpo/rewards/helpers:letter_reward/mean".replace("helpers:", "") in keys
    for a, b in zip(rows(tmp_path / "alone" / "metrics.jsonl"), rows(tmp_path / "alright" / "metrics.jsonl")):
        assert {k: a[k] for k in keys if "per_s" not in k} == {k: b[k] for k in keys if "per_s" not in k}
    from safetensors.torch import load_file

    x, y = load_file(alone.final_dir / "model.safetensors"), load_file(both.final_dir / "model.safetensors")
    assert all(torch.equal(x[k], y[k]) for k in x)


def test_resume_mid_run_is_exact(tmp_path):
    """6 steps saving at 3 (packed rows, a KL term to the initial weights, num_iterations = 2:
    step 3 generates and step 4 trains on its kept completions again); the resumed run's steps 4-6
    are identical, evaluations included. The stream draws no prompts at reuse steps."""
    cfg = grpo_config(tmp_path / "run", "train.max_steps=6", "train.save_steps=3", "train.eval_steps=3",
                      "train.packing=true", "objectives.0.beta=0.05", "objectives.0.num_iterations=2",
                      "objectives.0.loss=dapo", "objectives.0.data.eval_fraction=0.25")
    full = train(cfg)
    recs = rows(tmp_path / "run" / "metrics.jsonl")
    e = recs[0]["epoch/grpo"]  # 4 prompts of the training rows at each generating step only
    assert [r["epoch/grpo"] for r in recs] == pytest.approx([e, e, 2 * e, 2 * e, 3 * e, 3 * e])
    assert recs[1]["grpo/ratio"] != 1.0 and recs[0]["grpo/ratio"] == 1.0  # the reuse step's ratio moved
    assert recs[1]["grpo/kl"] > 0
    shutil.rmtree(tmp_path / "run" / "final")
    cfg.train.resume = True
    trainer = build_trainer(cfg)
    assert trainer.step == 3 and trainer.runs["grpo"].objective.kept.remaining == 1
    rest = trainer.train()
    assert rest.train_losses == full.train_losses[3:]
    assert rest.eval_history == full.eval_history[2:]  # step 3 evaluated before its checkpoint


def test_per_row_weights_reach_the_completions(tmp_path):
    """Per-row weights (data.weight_key) weigh each prompt's completions in the losses and the units:
    weight 2 on every row is no weighting (the same losses; the same update up to rounding), and
    weights 1 and 3 give the value -sum(w r) / sum(w) over the step's completions."""
    ws = workspace()
    rows_in = [json.loads(x) for x in (ws / "grpo.jsonl").read_text().splitlines()]
    for name, w in (("two", lambda i: 2.0), ("mixed", lambda i: 1.0 + 2 * (i % 2))):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({**r, "w": w(i)}) + "\n" for i, r in enumerate(rows_in)))
    plain = train(grpo_config(tmp_path / "plain", "train.max_steps=2"))
    two = train(grpo_config(tmp_path / "two", "train.max_steps=2", "objectives.0.data.weight_key=w",
                            f"objectives.0.data.path={tmp_path / 'two.jsonl'}"))
    assert [r["grpo"] for r in two.train_losses] == pytest.approx([r["grpo"] for r in plain.train_losses], abs=1e-6)
    trainer = build_trainer(grpo_config(tmp_path / "mixed", "train.max_steps=1", "objectives.0.data.weight_key=w",
                                        f"objectives.0.data.path={tmp_path / 'mixed.jsonl'}"))
    run = trainer.runs["grpo"]
    from bipost.kinds import StepContext

    batches = run.objective.prepare(trainer.model, [run.stream.batch(0), run.stream.batch(1)],
                                    StepContext(0, trainer.engine, trainer.engine.to_device))
    w = torch.cat([b["weights"] for b in batches])
    r = torch.cat([b["rewards"] for b in batches]).double()
    assert set(w.tolist()) <= {1.0, 3.0} and len(set(w.tolist())) == 2
    with torch.no_grad():
        outs = [run.objective.loss(trainer.model, b).weighted(b["weights"]) for b in batches]
    value = sum(float(o.losses.double().sum()) for o in outs) / sum(run.objective.units(b) for b in batches)
    assert value == pytest.approx(float(-(w * r).sum() / w.sum()), abs=1e-6)


def test_a_failing_reward_function_is_a_clear_error(tmp_path):
    """A reward function that raises stops the run with an error naming the objective, the step and
    the function (and chaining its own exception)."""
    cfg = grpo_config(tmp_path / "run", "objectives.0.rewards.1.function=helpers:failing_reward")
    with pytest.raises(RewardError, match=r"objective 'grpo' at step 1: reward function 'failing_reward' raised "
                                          r"ZeroDivisionError: float division by zero") as err:
        train(cfg)
    assert isinstance(err.value.__cause__.__cause__, ZeroDivisionError)


def test_measure_is_the_negative_greedy_reward_in_compare(tmp_path):
    """The held-out measure of a grpo objective is -mean reward of greedy completions of the
    held-out prompts (recomputed here); ``compare`` runs it next to SFT under sequential, ALRIGHT
    and MAXRIGHT (whose refreshes measure it too) and labels it as a reward."""
    from bipost.report.compare import run_compare

    cfg = grpo_config(tmp_path / "c", "train.max_steps=2", "schedule.max_eval_steps=1",
                      "objectives.0.data.eval_fraction=0.25", "objectives.1.data.eval_fraction=0.1",
                      kinds=("grpo", "sft"))
    result = run_compare(cfg, tmp_path / "c", methods=["sequential", "alright", "maxright"])
    maxright = rows(tmp_path / "c" / "maxright" / "metrics.jsonl")
    assert "probe/grpo" in maxright[0]
    table = result.table_md.read_text()
    assert "final grpo -reward" in table and "final sft loss" in table

    trainer = build_trainer(grpo_config(tmp_path / "m", kinds=("grpo",)))

    run = trainer.runs["grpo"]
    eval_rows = run.eval if len(run.eval) else run.train
    batch = run.objective.collate(trainer.tokenizer.pad_token_id)(list(eval_rows[:4]))
    tok = trainer.tokenizer
    from bipost.evaluation.generations import eos_ids

    gen = generate(trainer.model, batch["prompt_ids"], pad_id=tok.pad_token_id, eos_id=eos_ids(tok, trainer.model),
                   max_new_tokens=6)
    texts = [tok.decode(c, skip_special_tokens=True) for c in gen.completion_ids]
    expected = [-(float(" ".join(t.split()) == c["answer"]) + 0.5 * f)
                for t, c, f in zip(texts, batch["columns"], letter_reward(None, texts))]
    with torch.no_grad():
        out = run.objective.measure(trainer.model, batch)
    assert out.losses.tolist() == pytest.approx(expected) and out.units.tolist() == [1.0] * 4


# ------------------------------------------------------------------------------ 2 ranks
def two_rank_args() -> list[str]:
    """The grpo scenario of ``tests/two_ranks.py``: 5 steps, 4 prompts a step (micro-batch 2), a KL term,
    num_iterations = 2, a checkpoint at step 3 (between a generating step and its reuse)."""
    args = [f"objectives.0.{f.split('.', 2)[2]}" for f in grpo_fields(0)]
    return args + [f"model.path={workspace() / 'model'}", "train.progress=false", "train.max_steps=5",
                   "train.save_steps=3", "train.batch_size=4", "train.micro_batch_size=2", "optim.lr=1e-3",
                   "objectives.0.kind=grpo", f"objectives.0.data.path={workspace() / 'grpo.jsonl'}",
                   "objectives.0.num_iterations=2", "objectives.0.beta=0.05"]


def test_two_ranks_equal_one_rank(tmp_path, two_ranks):
    """2 ranks x micro-batch 2 (gloo, DDP) = 1 rank x micro-batch 2 x accumulation 2: each rank
    generates for its own prompts with the seed of its micro-batch's place in the step, so the same
    completions, rewards and losses come out (num_iterations = 2 with a KL term: every rank's kept
    completions are checkpointed). Resuming at step 3 on 2 ranks reproduces steps 4-5. A reward
    function that fails on rank 1 only stops both ranks at once with a clear error."""
    ranks = two_ranks("grpo")
    from bipost.configio import load_config

    single = train(load_config(overrides=two_rank_args() + [f"train.output_dir={tmp_path / 'single'}"]))
    expected = [r["grpo"] for r in single.train_losses]
    assert any(v != 0 for v in expected)
    for r in ranks:
        assert r["backend"] == "ddp"
        torch.testing.assert_close(torch.tensor([s["grpo"] for s in r["train"]]), torch.tensor(expected),
                                   rtol=1e-5, atol=1e-6)
        assert r["resumed_from"] == "step-00000003"
        assert r["resumed"] == r["train"][3:]
    assert not set(ranks[0]["first_indices"]["grpo"]) & set(ranks[1]["first_indices"]["grpo"])
    one = rows(tmp_path / "single" / "metrics.jsonl")
    for key in ("grpo/reward", "grpo/completion_length", "grpo/kl", "grpo/reward_std"):
        torch.testing.assert_close(torch.tensor([m[key] for m in ranks[0]["metrics"]]),
                                   torch.tensor([m[key] for m in one]), rtol=1e-4, atol=1e-6)
    assert "RewardError: objective 'grpo' at step 1: reward function 'failing_reward' raised" in ranks[1]["failing"]
    assert ranks[0]["failing"] == ("RewardError: objective 'grpo' at step 1: a reward function failed on another "
                                   "rank (see its error)")

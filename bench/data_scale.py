"""Data at scale: bipost's token store vs TRL's dataset preparation (issue 12). Not a test.

For 10 k / 100 k / 1 M synthetic rows with HH-RLHF-like lengths (generated here: lognormal
character lengths fitted to Anthropic HH harmless-base, multi-turn ``\\n\\nHuman: … \\n\\nAssistant:``
prompts), for SFT (``prompt``/``completion``) and preference (``prompt``/``chosen``/``rejected``)
rows, each measured in its own fresh process:

* bipost ``first``: ``load_objective_data`` into an empty ``data.cache_dir`` (tokenization);
* bipost ``cached``: the same call again (a relaunch: key + memory maps);
* TRL ``first``: ``datasets.load_dataset("json")`` + ``SFTTrainer`` / ``DPOTrainer`` construction
  (their tokenization through ``datasets.map``), empty HF datasets cache, same tokenizer and
  ``num_proc``; TRL ``cached``: the same again (datasets' fingerprint cache);
* every process then draws :data:`DRAWS` micro-batches of 8 as training would (bipost:
  ``ExampleStream`` + collate; TRL: its train dataloader and collator), before memory is read;
* ``peak MiB``: the process's peak RSS; ``data MiB``: peak RSS minus the RSS right before the data
  was loaded (imports, tokenizer and, for TRL, a tiny model already in memory); ``B/token`` is that
  over the data's tokens (prompt + response for SFT; prompt + chosen + rejected for pairs).
  For bipost it is also split into anonymous memory and mapped file pages (``RssAnon`` /
  ``RssFile``: page cache shared by every process mapping the store, reclaimable).

It also launches two processes at once on an empty cache (two ranks of one node) and checks that
exactly one of them tokenizes. Run from the repository root::

    .venv/bin/python bench/data_scale.py --sizes 10000,100000 --num-proc 2
    .venv/bin/python bench/data_scale.py --sizes 1000000 --num-proc 2 --skip-trl-first  # etc.

Results are printed as a Markdown table (and JSON with ``--json``); bench/RESULTS.md holds them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LEN = 1024
DRAWS = 2000
"""Micro-batches of 8 each measured process draws after loading (16,000 examples), as training would."""

# log-normal character lengths (mean and std of log(chars)) and turn counts measured on HH-RLHF
# harmless-base test (2,312 pairs): prompt median 362 chars, chosen 111, rejected 146.
PROMPT_LOG, CHOSEN_LOG, REJECTED_LOG = (5.71, 1.05), (4.68, 1.00), (4.89, 1.03)
MEAN_TURNS = 2.5


# ============================================================================ data
def _corpus(rng, n_chars: int) -> str:
    """Zipf-distributed pseudo-words with some punctuation: text a BPE compresses like English."""
    import numpy as np

    syll = ["ka", "to", "ri", "men", "sa", "lo", "pe", "der", "an", "is", "the", "ou", "ing", "str", "ble",
            "co", "ma", "ne", "vi", "tra", "ex", "pro", "ly", "ed", "er", "al", "un", "re", "ti", "on"]
    words = sorted({"".join(rng.choice(syll, size=int(k))) for k in rng.integers(1, 4, size=6000)})
    rng.shuffle(words)  # Zipf ranks unrelated to spelling
    p = 1.0 / np.arange(1, len(words) + 1) ** 1.05
    idx = rng.choice(len(words), size=n_chars // 5, p=p / p.sum())
    punct = rng.choice(["", "", "", "", "", ",", ".", "?"], size=len(idx))
    return " ".join(words[i] + q for i, q in zip(idx, punct))


def _lengths(rng, n: int, log: tuple[float, float]):
    import numpy as np

    return np.clip(np.exp(rng.normal(log[0], log[1], n)), 12, 8000).astype(int)


def generate(path: Path, n: int, kind: str, seed: int = 0) -> None:
    """``n`` rows of ``kind`` (sft | pref) as JSON lines at ``path``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    text = _corpus(rng, 4 << 20)
    plen, clen, rlen = _lengths(rng, n, PROMPT_LOG), _lengths(rng, n, CHOSEN_LOG), _lengths(rng, n, REJECTED_LOG)
    turns = 1 + rng.geometric(1 / MEAN_TURNS, size=n) - 1
    starts = rng.integers(0, len(text) - 20000, size=(n, 3))

    def piece(start: int, length: int) -> str:
        a = text.find(" ", start) + 1
        b = text.find(" ", a + length)
        return text[a:b]

    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for i in range(n):
            body = piece(starts[i, 0], plen[i])
            k = max(1, int(turns[i]))
            cut = np.linspace(0, len(body), 2 * k - 1, endpoint=False).astype(int)[1:]
            parts = [body[a:b] for a, b in zip([0, *cut], [*cut, len(body)])]
            prompt = "".join(f"\n\n{'Human' if j % 2 == 0 else 'Assistant'}: {t.strip()}" for j, t in enumerate(parts))
            prompt += "\n\nAssistant:"
            row = {"prompt": prompt}
            if kind == "sft":
                row["completion"] = " " + piece(starts[i, 1], clen[i])
            else:
                row["chosen"] = " " + piece(starts[i, 1], clen[i])
                row["rejected"] = " " + piece(starts[i, 2], rlen[i])
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


def workspace(ws: Path, sizes: list[int]) -> None:
    ws.mkdir(parents=True, exist_ok=True)
    if not (ws / "model").exists():
        import numpy as np

        from bipost.tiny import save_tiny

        sample = _corpus(np.random.default_rng(1), 2 << 20)
        texts = [sample[i:i + 2000] for i in range(0, len(sample), 2000)] + ["\n\nHuman: a\n\nAssistant: b"] * 50
        save_tiny(ws / "model", texts, vocab_size=8192, hidden_size=32, num_heads=2)
    for n in sizes:
        for kind in ("sft", "pref"):
            path = ws / f"{kind}-{n}.jsonl"
            if not path.exists():
                t0 = time.perf_counter()
                generate(path, n, kind)
                print(f"generated {path.name} ({path.stat().st_size / 2**20:.0f} MiB) in "
                      f"{time.perf_counter() - t0:.0f} s", flush=True)


# ============================================================================ workers (one process each)
def _rss() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM", "RssAnon", "RssFile")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) * 1024
    return out


def _mapped(folder: Path) -> int:
    """RSS of this process's mappings of files under ``folder`` (from /proc/self/smaps)."""
    total, inside = 0, False
    prefix = str(folder.resolve())
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5 and head[0][0] in "0123456789abcdef":
                inside = len(head) >= 6 and head[5].startswith(prefix)
            elif inside and line.startswith("Rss:"):
                total += int(head[1]) * 1024
    return total


def worker_bipost(ws: Path, kind: str, n: int, cache: Path, num_proc: int, draw: int) -> dict:
    from bipost.config import DataConfig
    from bipost.data import ExampleStream, SFTExample, collate_sft, load_objective_data
    from bipost.models import load_tokenizer

    tok = load_tokenizer(str(ws / "model"))
    collate_sft([SFTExample(0, (1,), (2,))], 0)  # page torch's code in before the baseline
    before = _rss()
    cfg = DataConfig(path=str(ws / f"{kind}-{n}.jsonl"), max_len=MAX_LEN, cache_dir=str(cache), num_proc=num_proc)
    t0 = time.perf_counter()
    data = load_objective_data(cfg, "dpo" if kind == "pref" else "sft", tok)
    seconds = time.perf_counter() - t0
    loaded = _rss()
    store = data.train.store
    tokens = sum(int(store.offsets[c.name][-1]) for c in store.columns if c.kind == "ragged")
    stream = ExampleStream(data.train, 8, data.collate, seed=0)
    t1 = time.perf_counter()
    for _ in range(draw):
        stream.next()
    draw_s = time.perf_counter() - t1
    after = _rss()
    peak = max(after["VmHWM"], loaded["VmHWM"])
    return {"framework": "bipost", "seconds": seconds, "cache": data.summary.cache, "rows": data.summary.rows_read,
            "examples": len(data.train), "tokens": tokens, "peak": peak, "data": peak - before["VmRSS"],
            "anon": after["RssAnon"] - before["RssAnon"], "file": after["RssFile"] - before["RssFile"],
            "mapped": _mapped(cache),
            "draw_ms": 1000 * draw_s / max(draw, 1), "store_bytes": sum(p.stat().st_size for p in store.path.iterdir())}


def worker_trl(ws: Path, kind: str, n: int, cache: Path, num_proc: int, draw: int) -> dict:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ["HF_DATASETS_CACHE"] = str(cache)
    datasets.config.HF_DATASETS_CACHE = Path(cache)
    tok = AutoTokenizer.from_pretrained(ws / "model")
    model = AutoModelForCausalLM.from_pretrained(ws / "model")
    common = dict(output_dir=str(cache / "out"), max_length=MAX_LEN, dataset_num_proc=num_proc, report_to=[],
                  use_cpu=True, per_device_train_batch_size=8)
    before = _rss()
    t0 = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=str(ws / f"{kind}-{n}.jsonl"), split="train",
                               cache_dir=str(cache))
    if kind == "sft":
        from trl import SFTConfig, SFTTrainer

        trainer = SFTTrainer(model=model, args=SFTConfig(**common), train_dataset=ds, processing_class=tok)
    else:
        from trl import DPOConfig, DPOTrainer

        trainer = DPOTrainer(model=model, args=DPOConfig(**common), train_dataset=ds, processing_class=tok)
    seconds = time.perf_counter() - t0
    loader = trainer.get_train_dataloader()  # as training draws them: sampler + TRL's collator
    batches = iter(loader)
    for _ in range(draw):
        if next(batches, None) is None:  # a new epoch
            batches = iter(loader)
            next(batches)
    after = _rss()
    train = trainer.train_dataset
    cols = [c for c in ("input_ids", "prompt_ids", "chosen_ids", "rejected_ids") if c in train.column_names]
    tokens = 0
    for c in cols:  # list lengths from the Arrow offsets, without materialising Python lists
        arr = train.data.column(c)
        tokens += sum(len(chunk.values) for chunk in arr.chunks)
    return {"framework": "trl", "seconds": seconds, "rows": len(ds), "examples": len(train), "tokens": tokens,
            "peak": after["VmHWM"], "data": after["VmHWM"] - before["VmRSS"],
            "anon": after["RssAnon"] - before["RssAnon"], "file": after["RssFile"] - before["RssFile"],
            "mapped": _mapped(cache)}


def run_worker(args: list[str], timeout: int = 7200) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, __file__, "--worker", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"worker {args} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def two_ranks(ws: Path, n: int, cache: Path, num_proc: int) -> list[str]:
    """Two processes at once on an empty cache, as two ranks of one node: what did each do?"""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", "bipost", str(ws), "sft", str(n), str(cache),
                               str(num_proc), "0"], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True) for _ in range(2)]
    return [json.loads(p.communicate()[0].strip().splitlines()[-1])["cache"] for p in procs]


# ============================================================================ main
def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        what, ws, kind, n, cache, num_proc = sys.argv[2:8]
        if what == "bipost":
            out = worker_bipost(Path(ws), kind, int(n), Path(cache), int(num_proc), int(sys.argv[8]))
        else:
            out = worker_trl(Path(ws), kind, int(n), Path(cache), int(num_proc), int(sys.argv[8]))
        print(json.dumps(out))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--kinds", default="sft,pref")
    ap.add_argument("--num-proc", type=int, default=2)
    ap.add_argument("--workspace", default="/tmp/bipost-data-scale")
    ap.add_argument("--no-trl", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the caches (default: delete them after each size)")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    ws = Path(args.workspace)
    sys.path.insert(0, str(ROOT / "src"))
    workspace(ws, sizes)
    results = []
    for n in sizes:
        for kind in args.kinds.split(","):
            cache = ws / f"cache-bipost-{kind}-{n}"
            shutil.rmtree(cache, ignore_errors=True)
            for phase in ("first", "cached"):
                r = run_worker(["bipost", str(ws), kind, str(n), str(cache), str(args.num_proc), str(DRAWS)])
                results.append({**r, "n": n, "kind": kind, "phase": phase})
                print(json.dumps(results[-1]), flush=True)
            if not args.no_trl:
                tcache = ws / f"cache-trl-{kind}-{n}"
                shutil.rmtree(tcache, ignore_errors=True)
                for phase in ("first", "cached"):
                    r = run_worker(["trl", str(ws), kind, str(n), str(tcache), str(args.num_proc), str(DRAWS)])
                    results.append({**r, "n": n, "kind": kind, "phase": phase})
                    print(json.dumps(results[-1]), flush=True)
                if not args.keep:
                    shutil.rmtree(tcache, ignore_errors=True)
            if not args.keep:
                shutil.rmtree(cache, ignore_errors=True)
    rank_cache = ws / "cache-two-ranks"
    shutil.rmtree(rank_cache, ignore_errors=True)
    ranks = two_ranks(ws, sizes[0], rank_cache, args.num_proc)
    shutil.rmtree(rank_cache, ignore_errors=True)
    print(table(results, args.num_proc, ranks))
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "two_ranks": ranks}, indent=1))


def table(results: list[dict], num_proc: int, ranks: list[str]) -> str:
    mib = 2 ** 20
    lines = [f"num_proc={num_proc}; two processes at once on an empty cache: {' + '.join(ranks)} "
             f"({'tokenized once' if sorted(ranks) == ['built', 'cached'] else 'NOT once'})", "",
             "| rows | data | framework | phase | seconds | rows/s | tokens | peak MiB | data MiB | B/token | "
             "anon MiB | mapped data MiB | (anon + mapped)/token |",
             "|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(
            f"| {r['n']:,} | {r['kind']} | {r['framework']} | {r['phase']} | {r['seconds']:.2f} | "
            f"{r['rows'] / r['seconds']:,.0f} | {r['tokens']:,} | {r['peak'] / mib:,.0f} | {r['data'] / mib:,.0f} | "
            f"{r['data'] / max(r['tokens'], 1):.2f} | {r['anon'] / mib:,.1f} | {r['mapped'] / mib:,.1f} | "
            f"{(max(r['anon'], 0) + r['mapped']) / max(r['tokens'], 1):.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

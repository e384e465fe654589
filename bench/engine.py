"""Model runtime benchmark: plain `generate()` (baseline) vs our engine, same run, same device.

Writes a random checkpoint in the published CXR-LLaVA v2 layout (7B-shaped, or tiny with
--tiny), loads it through the real loader, checks that both paths produce the same greedy
tokens, then prints one table:
  (a) one report of N forced new tokens on an idle device,
  (b) throughput with Q studies queued (baseline: generate() in batches of B),
plus peak memory and the device name. Random weights: the text itself is meaningless.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cds_service.inference.base import ReportRequest  # noqa: E402
from cds_service.inference.cxr_llava.generate import left_pad, splice  # noqa: E402
from cds_service.inference.cxr_llava.loader import LoadedCheckpoint, load_checkpoint  # noqa: E402
from cds_service.inference.cxr_llava.make_tiny import make_checkpoint  # noqa: E402
from cds_service.inference.cxr_llava.writer import TINY_BANNER, CxrLlavaReportWriter  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads, no GPU"


def commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def studies(count: int, seed: int = 0) -> list[ReportRequest]:
    rng = np.random.default_rng(seed)
    return [ReportRequest(rng.integers(0, 256, (600, 560), dtype=np.uint8)) for _ in range(count)]


@torch.inference_mode()
def plain_generate(
    ckpt: LoadedCheckpoint, writer: CxrLlavaReportWriter, batch: list[ReportRequest], tokens: int
) -> list[list[int]]:
    """The baseline: the same inputs through transformers' own generate()."""
    images = ckpt.model.encode_images(writer.pixels(batch))
    ids = ckpt.tokenizer.prompt_ids("report")
    embeds, mask = left_pad([splice(ckpt.model, ids, image) for image in images])
    out = ckpt.model.language.generate(
        inputs_embeds=embeds,
        attention_mask=mask,
        max_new_tokens=tokens,
        min_new_tokens=tokens,
        do_sample=False,
        pad_token_id=0,
    )
    return [[int(t) for t in row] for row in out[:, -tokens:].tolist()]


def timed(fn: object, device: torch.device, runs: int) -> float:
    times = []
    for _ in range(runs):
        sync(device)
        started = time.perf_counter()
        fn()  # type: ignore[operator]
        sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tiny", action="store_true", help="tiny random model (CPU is fine)")
    parser.add_argument("--dir", help="checkpoint folder (written when it has no config.json)")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--queued", type=int, default=64)
    parser.add_argument("--baseline-batch", type=int, default=32)
    parser.add_argument("--engine-batch", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--decoder",
        choices=["auto", "dynamic", "static"],
        default="auto",
        help="engine decode path (auto: static cache + CUDA graphs on CUDA, dynamic on CPU)",
    )
    args = parser.parse_args()

    folder = Path(args.dir or tempfile.mkdtemp(prefix="cxr-bench-"))
    if not (folder / "config.json").is_file():
        started = time.perf_counter()
        make_checkpoint(folder, full_size=not args.tiny)
        print(f"wrote random checkpoint to {folder} in {time.perf_counter() - started:.0f} s",
              file=sys.stderr)  # fmt: skip
    started = time.perf_counter()
    ckpt = load_checkpoint(folder, device=args.device)
    load_s = time.perf_counter() - started
    device = ckpt.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    writer = CxrLlavaReportWriter(
        ckpt,
        max_new_tokens=args.tokens,
        max_batch_size=args.engine_batch,
        ignore_eos=True,
        decoder=args.decoder,
    )
    one = studies(1)
    queued = studies(args.queued, seed=1)

    # Correctness first: both paths give the same greedy tokens for one study.
    expected = ckpt.tokenizer.decode(plain_generate(ckpt, writer, one, args.tokens)[0])
    got = writer.write_reports(one)[0].removeprefix(TINY_BANNER).strip()
    same = expected == got

    plain_gen = timed(lambda: plain_generate(ckpt, writer, one, args.tokens), device, args.runs)
    engine_one = timed(lambda: writer.write_reports(one), device, args.runs)

    def baseline_all() -> None:
        for start in range(0, len(queued), args.baseline_batch):
            plain_generate(ckpt, writer, queued[start : start + args.baseline_batch], args.tokens)

    plain_all = timed(baseline_all, device, 1)
    writer.write_reports(queued[: args.engine_batch])  # warm-up: the service does it at start
    engine_all = timed(lambda: writer.write_reports(queued), device, 1)
    metrics = writer.metrics()
    writer.close()
    peak = (
        torch.cuda.max_memory_allocated() / 2**30
        if device.type == "cuda"
        else metrics.peak_memory_bytes / 2**30
    )
    kind = "tiny" if args.tiny else "7B-shaped"
    print(f"# model runtime benchmark {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, commit {commit()}")
    prompt_tokens = len(ckpt.tokenizer.prompt_ids("report")) - 1 + ckpt.config.vision.num_patches
    print(
        f"device: {device_name(device)}; dtype {str(ckpt.dtype).removeprefix('torch.')}; "
        f"{kind} random checkpoint, {ckpt.parameter_count() / 1e9:.3f} B parameters; "
        f"load {load_s:.1f} s; prompt+image {prompt_tokens} tokens; {args.tokens} forced new "
        f"tokens; engine decoder {'static' if writer.static else 'dynamic'} cache"
        f"{', CUDA graphs' if writer.static and writer.static.cuda_graphs else ''}; "
        f"same greedy tokens: {'yes' if same else 'NO'}"
    )
    print("| case | plain generate() | engine | ratio (engine faster by) |")
    print("|---|---|---|---|")
    print(f"| (a) one report, idle device | {plain_gen:.3f} s | {engine_one:.3f} s | "
          f"{plain_gen / engine_one:.2f}x |")  # fmt: skip
    plain_rate = len(queued) / plain_all
    engine_rate = len(queued) / engine_all
    print(f"| (b) {len(queued)} queued studies | {plain_rate:.2f} reports/s (batch "
          f"{args.baseline_batch}) | {engine_rate:.2f} reports/s (largest batch "
          f"{metrics.largest_batch}) | {engine_rate / plain_rate:.2f}x |")  # fmt: skip
    print(f"| peak memory | | {peak:.2f} GiB | |")
    print(f"| engine tokens/s (all runs) | | {metrics.tokens_per_s:.0f} | |")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())

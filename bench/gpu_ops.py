"""Check and time the Triton patch ops on a CUDA GPU (run by bench/gpu_check.sh).

    python bench/gpu_ops.py [--out results.json]
    python bench/gpu_ops.py --dry-run       # tiny fp32 shapes on the CPU interpreter: tests this script

1. Compile: the first call of every kernel variant, timed.
2. Exactness in fp32 (ieee dot products) at odd shapes against a float64 truth, uniform
   and power-law position weights.
3. Accuracy in bf16 against a float64 truth computed from the same bf16 values: the Triton
   error must be no worse than the plain bf16 PyTorch computation's (bf16 logits from a
   bf16 matmul, then cross-entropy; F.embedding_bag in bf16) plus 1e-2.
4. Time and peak memory of forward+backward: Triton (uniform and power-law position
   weights) vs the reference, the chunked torch backend, plain bf16 PyTorch and
   F.linear_cross_entropy.

Exits 1 when a check fails. Writes JSON (to --out).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if "--dry-run" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # must be set before triton is first imported
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from megapatch.ops import patch_embedding, patch_loss, triton_ops  # noqa: E402

IGNORE = -100
# The Triton loss's backward mode that is not the default, timed beside it.
OTHER_BACKWARD = {"atomic": "gemm", "gemm": "atomic"}[triton_ops.BACKWARD]


# ----------------------------------------------------------------------------- helpers


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _inputs(n, v, d, k, vocab_size, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(n, d, generator=g)
    weight = torch.randn(v, d, generator=g) * d**-0.5
    targets = torch.randint(0, vocab_size, (n, k), generator=g)
    targets[:, 1 % k] = targets[:, 0]  # duplicate ids inside a patch
    targets[torch.rand(n, k, generator=g) < 0.2] = IGNORE
    return hidden.to(device, dtype), weight.to(device, dtype), targets.to(device)


def _loss_and_grads(fn, hidden, weight, targets):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    loss = fn(h, w, targets)
    loss.backward()
    return loss.detach().double(), h.grad.double(), w.grad.double()


def _errors(got, want) -> dict:
    loss, gh, gw = got
    loss_t, gh_t, gw_t = want
    rel = lambda a, b: float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))  # noqa: E731
    return {
        "loss": float(abs(loss - loss_t) / abs(loss_t)),
        "grad_hidden": rel(gh, gh_t),
        "grad_weight": rel(gw, gw_t),
    }


def truth_loss(hidden, weight, targets, vocab_size, position_weights=None):
    """Float64, written independently of the ops: the ground truth."""
    h, w = hidden.double(), weight.double()
    lse = (h @ w[:vocab_size].t()).logsumexp(dim=1)  # [N]
    kept = targets != IGNORE
    picked = (h @ w.t()).gather(1, torch.where(kept, targets, 0))  # [N, K]
    scored = kept.double()  # [N, K] how much each target counts
    if position_weights is not None:
        scored = scored * position_weights.double() / position_weights.double().sum()
    return ((lse[:, None] - picked) * scored).sum() / scored.sum().clamp(min=1e-30)


def power_law(k, device):
    """Position weights 1, 1/2, ..., 1/K: the weighted case every check runs beside uniform."""
    return 1.0 / torch.arange(1, k + 1, dtype=torch.float32, device=device)


def plain_bf16_loss(hidden, weight, targets, vocab_size):
    """What a bf16 model does without fused ops: bf16 logits, then fp32 log-softmax."""
    logits = hidden @ weight.t()  # [N, V] in the input dtype
    log_probs = logits[:, :vocab_size].float().log_softmax(dim=-1)
    kept = targets != IGNORE
    picked = log_probs.gather(1, torch.where(kept, targets, 0))  # [N, K]
    return -(picked * kept).sum() / kept.sum().clamp(min=1)


def _other_backward(fn):
    """fn with the Triton loss's backward switched to its other mode (see triton_ops.BACKWARD)."""
    from megapatch.ops import triton_ops

    def wrapped(*args, **kwargs):
        saved = triton_ops.BACKWARD
        triton_ops.BACKWARD = OTHER_BACKWARD
        try:
            return fn(*args, **kwargs)
        finally:
            triton_ops.BACKWARD = saved

    return wrapped


def _timed(fn, device, reps):
    """Median seconds and peak extra memory (MiB) of fn() over reps runs after a warm-up."""
    fn()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    times = []
    for _ in range(reps):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    times.sort()
    peak = None
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return times[len(times) // 2], peak


# ----------------------------------------------------------------------------- checks


def check_compile(device, dtypes, k_values):
    """First call of every kernel variant (dtype × K × accumulate/grad flags)."""
    timings = {}
    for dtype in dtypes:
        for k in k_values:
            hidden, weight, targets = _inputs(256, 1000, 128, k, 1000, dtype, device)
            start = time.perf_counter()
            _loss_and_grads(
                lambda h, w, t: patch_loss(h, w, t, backend="triton"), hidden, weight, targets
            )
            w = weight.detach().clone().requires_grad_()
            patch_embedding(targets.clamp(min=0), w, backend="triton").sum().backward()
            _sync(device)
            timings[f"{str(dtype).split('.')[-1]} K={k}"] = time.perf_counter() - start
    return timings


def check_fp32_exact(device, shapes):
    """Triton in fp32 (ieee dots) against float64: the same bounds as the CPU tests."""
    failures, report = [], []
    for n, v, vocab_size, d, k in shapes:
        hidden, weight, targets = _inputs(n, v, d, k, vocab_size, torch.float32, device, seed=n)
        for weights in (None, power_law(k, device)):
            kw = {"vocab_size": vocab_size, "position_weights": weights}
            want = _loss_and_grads(
                functools.partial(truth_loss, **kw), hidden.double(), weight.double(), targets
            )
            fused = functools.partial(patch_loss, backend="triton", **kw)
            err = _errors(_loss_and_grads(fused, hidden, weight, targets), want)
            ok = err["loss"] <= 1e-6 and err["grad_hidden"] <= 1e-5 and err["grad_weight"] <= 1e-5
            label = "uniform" if weights is None else "power-law"
            report.append(
                {"shape": [n, v, vocab_size, d, k], "weights": label, "errors": err, "ok": ok}
            )
            if not ok:
                failures.append(f"fp32 patch_loss {n}x{v}x{d} K={k} {label}: {err}")
    return report, failures


def check_low_precision(device, dtype, shapes):
    """Triton in bf16 against the float64 truth, bounded by plain bf16 PyTorch's error + 1e-2."""
    failures, report = [], []
    for n, v, vocab_size, d, k in shapes:
        hidden, weight, targets = _inputs(n, v, d, k, vocab_size, dtype, device, seed=n + 1)
        truth_fn = functools.partial(truth_loss, vocab_size=vocab_size)
        truth = _loss_and_grads(truth_fn, hidden.double(), weight.double(), targets)
        plain_fn = functools.partial(plain_bf16_loss, vocab_size=vocab_size)
        plain = _errors(_loss_and_grads(plain_fn, hidden, weight, targets), truth)
        row = {"shape": [n, v, vocab_size, d, k], "plain_bf16": plain}
        for backend in ("triton", f"triton-{OTHER_BACKWARD}", "torch"):
            fn = functools.partial(patch_loss, vocab_size=vocab_size, backend=backend[:6])
            if backend == f"triton-{OTHER_BACKWARD}":
                fn = _other_backward(fn)
            err = _errors(_loss_and_grads(fn, hidden, weight, targets), truth)
            row[backend] = err
            bad = [key for key in err if err[key] > plain[key] + 1e-2]
            if backend.startswith("triton") and bad:
                failures.append(f"bf16 patch_loss {n}x{v}x{d} K={k}: {bad} {err} vs plain {plain}")
        # Embedding: fp32-accumulated gather-mean vs bf16 F.embedding_bag.
        ids = targets.clamp(min=0)
        grad_out = torch.randn(n, d, device=device).to(dtype)
        w64 = weight.detach().double().requires_grad_()
        want = w64[ids].mean(-2)
        want.backward(grad_out.double())
        want = want.detach()
        emb = {}
        for name in ("triton", "F.embedding_bag"):
            w = weight.detach().clone().requires_grad_()
            if name == "triton":
                out = patch_embedding(ids, w, backend="triton")
            else:
                out = F.embedding_bag(ids, w, mode="mean")
            out.backward(grad_out)
            emb[name] = {
                "out": float((out.detach().double() - want).abs().max() / want.abs().max()),
                "grad_weight": float(
                    (w.grad.double() - w64.grad).abs().max() / w64.grad.abs().max()
                ),
            }
        row["embedding"] = emb
        bad = [x for x in emb["triton"] if emb["triton"][x] > emb["F.embedding_bag"][x] + 1e-2]
        if bad:
            failures.append(f"bf16 patch_embedding {n}x{v}x{d} K={k}: {bad} {emb}")
        row["ok"] = not any(f"{n}x{v}x{d} K={k}" in f for f in failures)
        report.append(row)
    return report, failures


def time_ops(device, dtype, shapes, reps):
    report = []
    for n, v, d, k in shapes:
        report += _time_shape(device, dtype, n, v, d, k, reps)
    return report


def _time_shape(device, dtype, n, v, d, k, reps):
    hidden, weight, targets = _inputs(n, v, d, k, v, dtype, device)
    hidden.requires_grad_()
    weight.requires_grad_()
    weights = power_law(k, device)

    def loss_step(fn):
        def step():
            hidden.grad = weight.grad = None
            fn().backward()

        return step

    cases = {
        "triton": lambda: patch_loss(hidden, weight, targets, backend="triton"),
        "triton, power-law position weights": lambda: patch_loss(
            hidden, weight, targets, position_weights=weights, backend="triton"
        ),
        f"triton, {OTHER_BACKWARD} backward": _other_backward(
            lambda: patch_loss(hidden, weight, targets, backend="triton")
        ),
        "torch (chunked)": lambda: patch_loss(hidden, weight, targets, backend="torch"),
        "reference (fp32 logits)": lambda: patch_loss(hidden, weight, targets, backend="reference"),
        "plain bf16 PyTorch": lambda: plain_bf16_loss(hidden, weight, targets, v),
        "F.linear_cross_entropy, rows×K": lambda: F.linear_cross_entropy(
            hidden.repeat_interleave(k, dim=0),  # [N·K, D]: one row per target
            weight,
            targets.reshape(-1),
            ignore_index=IGNORE,
            options=torch.nn.LinearCrossEntropyOptions(),
        ),
    }
    loss_row = {"op": "patch_loss", "shape": [n, v, d, k], "dtype": str(dtype)}
    for name, fn in cases.items():
        try:
            seconds, peak = _timed(loss_step(fn), device, reps)
            loss_row[name] = {"ms": seconds * 1e3, "peak_mib": peak}
        except torch.cuda.OutOfMemoryError:
            loss_row[name] = {"error": "out of memory"}
            torch.cuda.empty_cache()
        except (AttributeError, TypeError, RuntimeError) as exc:  # e.g. an older torch
            loss_row[name] = {"error": f"{type(exc).__name__}: {exc}"[:160]}

    ids = targets.clamp(min=0)
    grad_out = torch.randn(n, d, device=device, dtype=dtype)
    w = weight.detach().clone().requires_grad_()

    def embedding_step(fn):
        def step():
            w.grad = None
            fn().backward(grad_out)

        return step

    embedding_cases = {
        "triton": lambda: patch_embedding(ids, w, backend="triton"),
        "torch": lambda: patch_embedding(ids, w, backend="torch"),
        "F.embedding_bag": lambda: F.embedding_bag(ids, w, mode="mean"),
    }
    embedding_row = {"op": "patch_embedding", "shape": [n, v, d, k], "dtype": str(dtype)}
    for name, fn in embedding_cases.items():
        seconds, peak = _timed(embedding_step(fn), device, reps * 5)
        embedding_row[name] = {"ms": seconds * 1e3, "peak_mib": peak}
    return [loss_row, embedding_row]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu_ops.json"))
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument(
        "--dry-run", action="store_true", help="tiny fp32 shapes on the CPU interpreter"
    )
    args = parser.parse_args()

    if args.dry_run:
        device, low = torch.device("cpu"), torch.float32  # bf16 is wrong in the interpreter
        k_values, reps = (1, 4), 1
        exact_shapes = [(252, 507, 500, 123, 4)]
        low_shapes = [(128, 300, 300, 64, 4)]
        time_shapes = [(128, 512, 64, 4)]
    else:
        if not torch.cuda.is_available():
            print("gpu_ops: no CUDA device visible; nothing to check", file=sys.stderr)
            return 2
        device, low = torch.device("cuda"), torch.bfloat16
        torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 truth must be fp32
        k_values, reps = (1, 2, 4, 8), args.reps
        exact_shapes = [
            (252, 507, 500, 123, 4),
            (1000, 4099, 4096, 256, 8),
            (4096, 32000, 32000, 1024, 1),
        ]
        low_shapes = [(8192, 32000, 32000, 1024, 4), (2000, 50304, 50257, 768, 2)]
        time_shapes = [(8192, 32000, 1024, 4), (16384, 128256, 4096, 4)]

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreter)"
    print(f"device: {name}, torch {torch.__version__}")
    result: dict = {"device": name, "torch": torch.__version__}
    failures: list[str] = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():  # after every stage, so a run cut short still leaves what it measured
        result["failures"] = failures
        out.write_text(json.dumps(result, indent=2) + "\n")

    start = time.perf_counter()
    result["compile_s"] = check_compile(device, (torch.float32, low), k_values)
    print(
        f"compile + first call: {sum(result['compile_s'].values()):.1f}s ({len(result['compile_s'])} variants)"
    )

    result["fp32_exact"], bad = check_fp32_exact(device, exact_shapes)
    failures += bad
    for row in result["fp32_exact"]:
        ok = "ok" if row["ok"] else "FAIL"
        print(f"fp32 exact {row['shape']} {row['weights']}: {ok} {row['errors']}")
    save()

    result["low_precision"], bad = check_low_precision(device, low, low_shapes)
    failures += bad
    for row in result["low_precision"]:
        print(f"{low} {row['shape']}: {'ok' if row['ok'] else 'FAIL'}")
        for key in ("plain_bf16", "triton", f"triton-{OTHER_BACKWARD}", "torch"):
            print(f"    {key:12s} " + " ".join(f"{k}={v:.2e}" for k, v in row[key].items()))
        for key, err in row["embedding"].items():
            print(f"    emb {key:8s} " + " ".join(f"{k}={v:.2e}" for k, v in err.items()))
    save()

    result["timing"] = time_ops(device, low, time_shapes, reps)
    for row in result["timing"]:
        print(f"\n{row['op']} {row['shape']} {row['dtype']}, forward+backward")
        for case, value in row.items():
            if isinstance(value, dict):
                if "error" in value:
                    print(f"    {case:36s} {value['error']}")
                else:
                    peak = "-" if value["peak_mib"] is None else f"{value['peak_mib']:.0f}"
                    print(f"    {case:36s} {value['ms']:9.2f} ms   peak {peak:>7s} MiB")

    result["total_s"] = time.perf_counter() - start
    save()
    print(f"\n{len(failures)} failure(s); {result['total_s']:.0f}s; wrote {out}")
    for failure in failures:
        print("FAIL", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

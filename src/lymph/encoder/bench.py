"""Stage-one benchmark figures (``docs/benchmarks.md``), measured in one run.

- training throughput (images/s), fed from the cache by the real pipeline;
- the same steps fed from uint8 tensors already in memory, and the ratio of the two step
  times (``feed_efficiency`` = in-memory step time / cache-fed step time, the median over
  back-to-back pairs; 1.0 means the input pipeline costs nothing, the target is >= 0.9);
- the machine's compute ceiling: dense matmul GFLOP/s through torch (fp32, and bf16 when
  training in bf16), and the training throughput as a fraction of it (achieved GFLOP/s =
  images/s x training FLOPs per image, counted as 3 x the forward conv/linear FLOPs); the
  fp32 fraction is taken per round against the ceiling measured just before and after it;
- embedding throughput (images/s, eval mode, reading the cache included).

Memory and cache rounds alternate and the medians are kept: the machine may be shared.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np
import torch

from lymph.data.cache import ImageCache
from lymph.encoder import distributed as D
from lymph.encoder.feed import ChunkFeeder, cache_reader, epoch_plan, feeder_threaded
from lymph.encoder.model import train_flops_per_image
from lymph.encoder.preprocess import Preprocess
from lymph.encoder.registry import get_method
from lymph.encoder.train import (
    TrainConfig,
    build_model,
    make_optimizer,
    resolve_precision,
    train_step,
)


def matmul_gflops(dtype: torch.dtype = torch.float32, n: int | None = None, repeats: int = 5,
                  device: torch.device | str = "cpu") -> float:
    """Median GFLOP/s of an ``n x n`` matmul (2 n^3 FLOPs) in ``dtype``.

    On CUDA: ``n`` 8192 (a 2048 matmul takes ~0.1 ms on a recent GPU, about a kernel
    launch) and each timing covers 10 back-to-back products, synchronising the chosen
    device (not the current one) before and after. On the CPU: ``n`` 2048, one product.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    n = n or (8192 if cuda else 2048)
    inner = 10 if cuda else 1
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    a @ b
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        for _ in range(inner):
            a @ b
        sync()
        times.append((time.perf_counter() - t) / inner)
    return 2.0 * n**3 / statistics.median(times) / 1e9


def bench_stage_one(cache: ImageCache, *, method: str = "ae", dim: int = 60,
                    batch_size: int | None = None, lr: float | None = None, steps: int = 40,
                    warmup: int = 3, repeats: int = 3, precision: str = "auto",
                    device: str = "cpu", embed_images: int = 2048, seed: int = 0,
                    threaded: bool | None = None) -> dict[str, Any]:
    """Stage-one figures on ``cache`` (see the module doc). Returns a flat dict.

    ``steps`` per round (40 x 128 images, about half an epoch of the real data) so that the
    feeder's start-up (reading its first buffer) weighs as much as in a real epoch.
    """
    env = D.setup(device)
    try:
        return _bench_stage_one(env, cache, method=method, dim=dim, batch_size=batch_size,
                                lr=lr, steps=steps, warmup=warmup, repeats=repeats,
                                precision=precision, embed_images=embed_images, seed=seed,
                                threaded=threaded)
    finally:
        D.teardown(env)  # a process group started here (under torchrun) ends here


def _bench_stage_one(env: D.DistEnv, cache: ImageCache, *, method: str, dim: int,
                     batch_size: int | None, lr: float | None, steps: int, warmup: int,
                     repeats: int, precision: str, embed_images: int, seed: int,
                     threaded: bool | None) -> dict[str, Any]:
    dev = env.device
    tc = TrainConfig(seed=seed, precision=precision)
    bs = batch_size or tc.batch_size
    m = get_method(method)
    mcfg = m.config_cls(dim=dim, size=cache.size)
    torch.manual_seed(seed)
    model = build_model(method, mcfg, dev)
    if lr is not None:
        tc.lr = lr
    opt = make_optimizer(model, tc)
    amp = resolve_precision(precision, dev)
    prep = Preprocess(cache.channel_mean, cache.channel_std, dev, channels_last=True,
                      generator=torch.Generator().manual_seed(seed))
    def sync() -> None:  # the chosen device, not the current one
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def step(batch: torch.Tensor) -> None:
        train_step(m, model, opt, batch.to(dev, non_blocking=True), prep, amp)

    chunk = int(cache.pixels.chunks[0])
    n = cache.n_images
    threaded_feed = feeder_threaded(dev) if threaded is None else threaded
    need = min(n, steps * bs)
    rng = np.random.default_rng(seed)
    mem = cache.read(0, need)
    mem_batches = [torch.from_numpy(np.ascontiguousarray(mem[rng.permutation(need)[:bs]]))
                   for _ in range(steps)]

    def run_memory() -> float:
        sync()
        t = time.perf_counter()
        for b in mem_batches:
            step(b)
        sync()
        return time.perf_counter() - t

    read = cache_reader(cache)  # the training loop's reader (RAM when the cache fits)

    def run_cache(r: int) -> float:
        plan = epoch_plan(n, chunk, bs, seed, r, buffer=tc.buffer_chunks)
        feeder = ChunkFeeder(read, plan, steps=steps, pin=dev.type == "cuda",
                             threaded=threaded_feed)
        sync()
        t = time.perf_counter()
        k = 0
        for b, _, _ in feeder:
            step(b)
            k += 1
        sync()
        if k != steps:  # a cache smaller than steps x batch: scale to a per-step time
            return (time.perf_counter() - t) * steps / max(k, 1)
        return time.perf_counter() - t

    for b in mem_batches[:warmup]:
        step(b)
    flops = train_flops_per_image(model, cache.size)
    t_mem, t_cache, c32, camp, fractions = [], [], [], [], []
    for r in range(repeats):
        # the ceilings right before and right after each cache-fed round: the machine's
        # speed drifts, so the fraction is taken round by round (median reported)
        before = matmul_gflops(torch.float32, device=dev)
        t_mem.append(run_memory())
        t_cache.append(run_cache(r))
        after = matmul_gflops(torch.float32, device=dev)
        c32.append((before + after) / 2)
        camp.append(matmul_gflops(amp, device=dev) if amp is not None else c32[-1])
        fractions.append(steps * bs / t_cache[-1] * flops / 1e9 / c32[-1])
    tm, tcache = statistics.median(t_mem), statistics.median(t_cache)
    ips_cache = steps * bs / tcache
    ips_mem = steps * bs / tm
    ceil32, ceil_amp = statistics.median(c32), statistics.median(camp)
    achieved = ips_cache * flops / 1e9

    # embedding: eval mode, fp32, reading the cache included
    model.eval()
    k = min(n, embed_images)
    eprep = Preprocess(cache.channel_mean, cache.channel_std, dev, channels_last=True)
    from lymph.encoder.embed import exact_fp32

    with torch.no_grad(), exact_fp32(dev):  # as the embedding pass: fp32, no TF32
        x = torch.from_numpy(cache.read(0, min(k, 64))).to(dev)
        m.features(model, eprep(x))  # warm-up
        sync()
        t = time.perf_counter()
        for a in range(0, k, chunk):
            px = cache.read(a, min(a + chunk, k))
            for s in range(0, len(px), 64):
                x = torch.from_numpy(px[s : s + 64]).to(dev, non_blocking=True)
                m.features(model, eprep(x)).float().cpu()
        sync()
        t_embed = time.perf_counter() - t

    return {
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "precision": "bf16" if amp is not None else "fp32",
        "image_size": cache.size,
        "batch_size": bs,
        "steps": steps,
        "repeats": repeats,
        "train_images_per_s": ips_cache,
        "train_images_per_s_memory": ips_mem,
        "step_s_cache": tcache / steps,
        "step_s_memory": tm / steps,
        # median of the per-round ratios: each pair ran back to back, so slow drifts in the
        # machine's load cancel out better than in the ratio of the medians
        "feed_efficiency": statistics.median(a / b for a, b in zip(t_mem, t_cache)),
        "feed_efficiency_rounds": [a / b for a, b in zip(t_mem, t_cache)],
        "train_gflop_per_image": flops / 1e9,
        "train_gflops_achieved": achieved,
        "matmul_gflops_fp32": ceil32,
        "matmul_gflops_train_dtype": ceil_amp,
        "fraction_of_fp32_ceiling": statistics.median(fractions),
        "fraction_of_fp32_ceiling_rounds": fractions,
        "fraction_of_train_dtype_ceiling": achieved / ceil_amp,
        "embed_images_per_s": k / t_embed,
    }


def bench_step_ablation(*, batch_size: int = 128, size: int = 112, steps: int = 8,
                        rounds: int = 5, precision: str = "auto", seed: int = 0,
                        malloc: bool = True,
                        only: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The autoencoder's CPU training step with each fast path switched off in turn.

    Variants: ``all`` (the default), ``no_<name>`` for each entry of
    :data:`lymph.encoder.fastcpu.layers.FAST`, ``none`` (every one off) and, with ``malloc``,
    ``no_malloc_tuning`` (the default in a child process with ``LYMPH_MALLOC_TUNING=0``:
    the tuning is per process). ``only``: measure just these variants. Random uint8
    batches: the work does not depend on the pixels. Rounds interleave the variants;
    returns the median step time of each (``step_s``), its ratio to ``all``
    (``slowdown``) and the page faults per step.
    """
    import json
    import os
    import resource
    import subprocess
    import sys

    from lymph.encoder.fastcpu import layers
    from lymph.encoder.model import AEConfig

    env = D.setup("cpu")
    D.teardown(env)  # one process: nothing distributed is measured here
    dev = env.device
    amp = resolve_precision(precision, dev)
    m = get_method("ae")
    gen = torch.Generator().manual_seed(seed)
    batches = [torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8,
                             generator=gen) for _ in range(steps)]
    saved = dict(layers.FAST)
    variants = {"all": {}, **{f"no_{k}": {k: False} for k in saved},
                "none": dict.fromkeys(saved, False)}
    variants = {v: off for v, off in variants.items() if only is None or v in only}
    times: dict[str, list[float]] = {v: [] for v in variants}
    faults: dict[str, list[float]] = {v: [] for v in variants}

    def run(v: str) -> None:
        layers.FAST.update(saved)
        layers.FAST.update(variants[v])
        torch.manual_seed(seed)
        model = build_model("ae", AEConfig(size=size), dev)
        opt = make_optimizer(model, TrainConfig())
        prep = Preprocess([0.5] * 3, [0.25] * 3, dev, channels_last=True,
                          generator=torch.Generator().manual_seed(seed))
        for b in batches[:2]:  # warm-up
            train_step(m, model, opt, b, prep, amp)
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = time.perf_counter()
        for b in batches:
            train_step(m, model, opt, b, prep, amp)
        times[v].append((time.perf_counter() - t) / steps)
        faults[v].append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / steps)

    child = ("import json; from lymph.encoder.bench import bench_step_ablation as b; "
             f"r = b(batch_size={batch_size}, size={size}, steps={steps}, rounds=1, "
             f"precision={precision!r}, seed={seed}, malloc=False, only=('all',)); "
             "print(json.dumps([r['step_s']['all'], r['faults_per_step']['all']]))")
    if malloc:
        times["no_malloc_tuning"], faults["no_malloc_tuning"] = [], []
    try:
        for _ in range(rounds):
            for v in variants:
                run(v)
            if malloc:
                out = subprocess.run([sys.executable, "-c", child], capture_output=True,
                                     text=True, check=True,
                                     env={**os.environ, "LYMPH_MALLOC_TUNING": "0"})
                t, f = json.loads(out.stdout.strip().splitlines()[-1])
                times["no_malloc_tuning"].append(t)
                faults["no_malloc_tuning"].append(f)
    finally:
        layers.FAST.update(saved)
    step = {v: statistics.median(t) for v, t in times.items()}
    return {
        "precision": "bf16" if amp is not None else "fp32",
        "batch_size": batch_size,
        "threads": torch.get_num_threads(),
        "rounds": rounds,
        "step_s": step,
        "slowdown": {v: s / step["all"] for v, s in step.items()} if "all" in step else {},
        "faults_per_step": {v: statistics.median(f) for v, f in faults.items()},
        "train_images_per_s": batch_size / step["all"] if "all" in step else None,
    }


def bench_feed(*, n: int = 10_850, size: int = 112, batch_size: int = 128, world: int = 1,
               epochs: int = 5, in_ram: bool = True, seed: int = 0) -> dict[str, Any]:
    """Seconds per epoch of feeding alone (no training): every rank's batches of
    :func:`epoch_plan` over ``n`` random images held in RAM, read from RAM
    (``in_ram``) or block by block as from a cache too large for it. Median of ``epochs``;
    ``images`` counts those fed with a non-zero weight (each image once per epoch)."""
    from lymph.encoder.feed import _InRam

    px = np.random.default_rng(seed).integers(0, 256, (n, 3, size, size), dtype=np.uint8)
    read = _InRam(px) if in_ram else (lambda a, b: px[a:b].copy())
    times, images = [], 0
    for e in range(epochs):
        plan = epoch_plan(n, 256, batch_size, seed, e)
        t = time.perf_counter()
        images = 0
        for r in range(world):
            feeder = ChunkFeeder(read, plan, rank=r, world=world, threaded=False)
            images += sum(len(x) for x, _, w in feeder if w > 0)
        times.append(time.perf_counter() - t)
    return {"world": world, "in_ram": in_ram, "images": images, "steps": plan.steps,
            "epoch_s": statistics.median(times), "threads": torch.get_num_threads()}

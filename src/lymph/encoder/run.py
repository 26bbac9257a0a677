"""``lymph embed``: get the image cache, train the encoder (or load one), embed every image
into the store; and :func:`embed_dataset`, which ``lymph predict --data`` uses to embed new
data the way an encoder was trained.

What a method is and needs comes from :mod:`lymph.encoder.registry`; training from
:mod:`lymph.encoder.train`; embedding from :mod:`lymph.encoder.embed`; combinations
(``A+B``) from :mod:`lymph.encoder.combine`; fold-safe label-trained methods from
:mod:`lymph.encoder.weak_folds`. Library errors name the setting (``method``, ``folds``);
the CLI shows its flag.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from lymph.data.cache import ImageCache, ingest, open_cache
from lymph.encoder import distributed as D
from lymph.encoder.checkpoint import load_checkpoint
from lymph.encoder.combine import (MORPHOMETRY, _check_morphometry_version, _concat, _extract,
                                   _morphometry_record, _part_checkpoint,
                                   embed_combined_dataset, part_store,
                                   write_combined_checkpoint)
from lymph.encoder.embed import (EmbedSummary, checkpoint_path, default_cache_path,
                                 embed_cache, loss_curve_path)
from lymph.encoder.registry import check_method, is_combination, method_spec, parts_of, resolve
from lymph.checks import check_channels
from lymph.errors import LymphError


def embed_dataset(data_dir: str | Path, encoder: str | Path, out: str | Path, *,
                  work_dir: str | Path | None = None, device: str = "auto") -> Path:
    """Ingest ``data_dir`` the way ``encoder`` was trained (image size, crop) into
    ``work_dir`` (default: beside ``out``), then embed it into the store ``out``."""
    ck = load_checkpoint(encoder)
    if is_combination(str(ck["method"])):  # `--method A+B`: one cache and store per part
        return embed_combined_dataset(data_dir, encoder, out, work_dir=work_dir, device=device)
    size, crop = int(ck["cache"]["size"]), ck["cache"].get("crop")
    cache_path = default_cache_path(out, size, work_dir)
    ingest(data_dir, cache_path, size=size, crop=crop)
    return embed_cache(open_cache(cache_path), encoder, out, device)


def run_embed(
    *,
    out: str | Path,
    data: str | Path | None = None,
    images: str | Path | None = None,
    method: str = "ae",
    dim: int | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    seed: int = 0,
    device: str = "auto",
    encoder: str | Path | None = None,
    resume: bool = False,
    size: int | None = None,
    cache: str | Path | None = None,
    progress: bool = True,
    crop: int | None = None,
    folds: int | None = None,
    lr_schedule: str | None = None,
    tta: bool = False,
    channels: tuple[int, ...] | None = None,
) -> EmbedSummary:
    """What ``lymph embed`` does: get the cache (ingesting ``data`` if given), train the
    encoder unless ``encoder`` is given, then embed every image into the store ``out``.

    ``size`` / ``crop`` (ingesting ``data``) default to the method's ``default_size`` /
    ``default_crop`` (112 px, whole image, when it declares none). Label-trained methods
    (``weak``) train ``folds`` fold scorers and a final one (:mod:`lymph.encoder.weak_folds`).
    ``lr_schedule`` (``constant`` or ``cosine``) overrides the method's; ``tta`` (weak only)
    averages each cell's logit over its 8 rotations / flips; ``channels`` (weak only) are
    the cell scorer's convolution widths (default 16, 32, 64, 64)."""
    out = Path(out)
    # under torchrun every check below runs inside the process group, so that an error
    # that every rank meets is printed once (D.fail) and one that a single rank meets (a
    # file it cannot read) stops the others
    with D.session(device) as env:
        return _run_embed(env, out=out, data=data, images=images, method=method, dim=dim,
                          epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                          device=device, encoder=encoder, resume=resume, size=size,
                          cache=cache, progress=progress, crop=crop, folds=folds,
                          lr_schedule=lr_schedule, tta=tta, channels=channels)


def _encoder_settings(encoder: str | Path) -> dict[str, Any]:
    """What run_embed needs from an ``--encoder`` checkpoint before embedding with it."""
    ck = load_checkpoint(encoder)
    return {"method": str(ck["method"]), "size": int(ck["cache"]["size"]),
            "crop": ck["cache"].get("crop")}


def _run_embed(env: D.DistEnv, *, out: Path, data: str | Path | None, images: str | Path | None,
               method: str, dim: int | None, epochs: int | None, batch_size: int | None,
               lr: float | None, seed: int, device: str, encoder: str | Path | None,
               resume: bool, size: int | None, cache: str | Path | None, progress: bool,
               crop: int | None, folds: int | None, lr_schedule: str | None = None,
               tta: bool = False, channels: tuple[int, ...] | None = None) -> EmbedSummary:
    if (data is None) == (images is None):
        raise LymphError("give exactly one of `data` DATA_DIR or `images` CACHE.zarr")
    if cache is not None and data is None:
        raise LymphError("`cache` says where `data` is ingested; with `images` the cache is given")
    if encoder is not None and resume:
        raise LymphError("`resume` continues a training; with `encoder` nothing is trained")
    if out.suffix.lower() not in (".h5", ".hdf5"):
        raise LymphError(f"`out` {out}: expected an HDF5 store path ending in .h5")
    check_method(method)  # unknown names fail early
    if lr_schedule is not None:
        from lymph.encoder.train import LR_SCHEDULES

        if lr_schedule not in LR_SCHEDULES:
            raise LymphError(f"lr_schedule: expected {' or '.join(LR_SCHEDULES)}, got {lr_schedule!r}")
        if encoder is not None:
            raise LymphError("`lr_schedule` sets a training; with `encoder` nothing is trained")
    for name, given in (("tta", tta), ("channels", channels is not None)):
        if given and (method != "weak" or encoder is not None):
            raise LymphError(f"`{name}`: only for training method weak (the cell scorer), not "
                             f"{'an existing encoder' if encoder is not None else 'method ' + method}")
    if channels is not None:
        channels = check_channels("channels", channels)
    # rank 0 reads the checkpoint (the other ranks get its settings, and later its weights)
    enc = D.main_decides(env, lambda: _encoder_settings(encoder)) if encoder is not None else None
    if is_combination(method) or (enc is not None and is_combination(enc["method"])):
        if folds is not None or lr_schedule is not None:
            raise LymphError(f"{'folds' if folds is not None else 'lr_schedule'}: not for a "
                             f"combination ({method}); train its parts separately")
        return run_combination(out=out, data=data, images=images, method=method,
                               encoder=encoder, device=device, size=size, crop=crop,
                               cache=cache, progress=progress, dim=dim, epochs=epochs,
                               batch_size=batch_size, lr=lr, seed=seed, resume=resume)
    spec = method_spec(method)
    if not spec.trainable and encoder is not None:
        raise LymphError(f"`method` {method} computes features without an encoder; "
                         "drop `encoder`")
    if folds is not None and not spec.needs_labels:
        raise LymphError(f"folds: only for methods trained from labels (method weak), "
                         f"not method {method}")
    if spec.needs_labels and folds is None:
        folds = 5
    summary = EmbedSummary(store=None, is_main=env.is_main, world=env.world)
    if enc is not None:
        size, crop = enc["size"], enc["crop"]
    else:
        size = size or spec.default_size
        crop = crop if crop is not None else spec.default_crop
    c = _get_cache(env, out, data, images, cache, size, crop, progress, summary)
    if not spec.trainable:
        summary.dim = _untrained(spec, c, out, env)
        summary.store = out
        return summary
    if encoder is None and spec.needs_labels:
        return _weak(c, out, folds or 5, seed, epochs, batch_size, lr, resume, env,
                     progress, summary, lr_schedule=lr_schedule, tta=tta, channels=channels)
    if encoder is None:
        encoder = _train(c, out, method, dim, epochs, batch_size, lr, seed, resume, env,
                         progress, summary, lr_schedule=lr_schedule)
    else:
        summary.checkpoint = Path(encoder)
    t0 = time.perf_counter()
    embed_cache(c, encoder, out, env=env, progress=progress)
    summary.embed_seconds = time.perf_counter() - t0
    summary.store = out
    if env.is_main:
        from lymph.store import open_store

        summary.dim = open_store(out).dim
    return summary


def _get_cache(env: D.DistEnv, out: Path, data: str | Path | None, images: str | Path | None,
               cache: str | Path | None, size: int, crop: int | None, progress: bool,
               summary: EmbedSummary) -> ImageCache:
    """The image cache: ``data`` ingested (rank 0; reused when already there) or ``images``."""
    if data is not None:
        cache_path = Path(cache) if cache else default_cache_path(out, size)
        # rank 0 ingests, the others then read the cache: they must see its folder (on
        # several machines, a shared filesystem; refused otherwise). They wait for it
        # without a collective timeout (D.main_does)
        D.check_shared_folder(env, cache_path.parent, "folder of the image cache (cache)")
        reused = D.main_does(env, f"ingest:{cache_path}", lambda: _ingest_with_progress(
            data, cache_path, size, crop, progress))
        summary.cache, summary.cache_reused = cache_path, reused
    else:
        cache_path = Path(images)  # type: ignore[arg-type]
        summary.cache, summary.cache_reused = cache_path, True
    c = open_cache(cache_path)
    D.check_same_cache(env, cache_path, c.fingerprint)
    summary.n_images, summary.n_patients = c.n_images, c.n_patients
    return c


def _train(c: ImageCache, out: Path, method: str, dim: int | None, epochs: int | None,
           batch_size: int | None, lr: float | None, seed: int, resume: bool,
           env: D.DistEnv, progress: bool, summary: EmbedSummary,
           lr_schedule: str | None = None) -> Path:
    """Train the method's encoder on ``c``; its checkpoint path."""
    from lymph.encoder.registry import get_method
    from lymph.encoder.train import TrainConfig, train

    m, spec = get_method(method), method_spec(method)
    # dim None: the method's default; the method's TrainConfig defaults
    # (``train_defaults``), overridden by the settings given
    mcfg = m.config_cls(size=c.size, **({} if dim is None else {"dim": dim}))
    tcfg = TrainConfig(seed=seed, **dict(spec.train_defaults))
    if epochs is not None:
        tcfg.epochs = epochs
    if batch_size is not None:
        tcfg.batch_size = batch_size
    if lr is not None:
        tcfg.lr = lr
    if lr_schedule is not None:
        tcfg.lr_schedule = lr_schedule
    ckp = checkpoint_path(out)
    res = train(c, ckp, method=method, model_config=mcfg, config=tcfg, resume=resume,
                env=env, progress=progress, loss_curve=loss_curve_path(out))
    summary.checkpoint, summary.loss_curve = ckp, res.loss_curve
    summary.trained_epochs, summary.losses = res.epochs_run, res.losses
    summary.train_seconds, summary.train_images_per_s = res.seconds, res.images_per_s
    return ckp


def _weak(c: ImageCache, out: Path, folds: int, seed: int, epochs: int | None,
          batch_size: int | None, lr: float | None, resume: bool, env: D.DistEnv,
          progress: bool, summary: EmbedSummary, lr_schedule: str | None = None,
          tta: bool = False, channels: tuple[int, ...] | None = None) -> EmbedSummary:
    """``--method weak``: K fold scorers + the final scorer, fold-safe store."""
    from lymph.encoder.methods.weak import WeakConfig
    from lymph.encoder.weak_folds import default_train_config, run_weak

    tcfg = default_train_config(seed)
    for k, v in (("epochs", epochs), ("batch_size", batch_size), ("lr", lr),
                 ("lr_schedule", lr_schedule)):
        if v is not None:
            setattr(tcfg, k, v)
    w = run_weak(c, out, folds=folds, seed=seed, config=tcfg, env=env, resume=resume,
                 progress=progress, model_config=WeakConfig(
                     size=c.size, tta=tta, **({"channels": channels} if channels else {})))
    final = w.losses.get("final", [])
    summary.checkpoint, summary.losses, summary.trained_epochs = w.final_checkpoint, final, tcfg.epochs
    summary.train_seconds, summary.train_images_per_s = w.train_seconds, w.images_per_s
    summary.embed_seconds, summary.store = w.embed_seconds, out
    summary.dim = 2
    summary.notes = [f"{folds} fold scorers + the final scorer ({summary.train_seconds:.0f} s "
                     f"of training in all); fold checkpoints: "
                     + ", ".join(str(p) for p in w.fold_checkpoints)]
    if w.oof and w.oof.get("auc_mean_prob") is not None:
        summary.notes.append(
            f"out-of-fold patient ROC AUC of the mean cell probability "
            f"{w.oof['auc_mean_prob']:.3f} (mean cell logit {w.oof['auc_mean_logit']:.3f})")
    return summary


def _ingest_with_progress(data: str | Path, cache_path: Path, size: int, crop: int | None,
                          progress: bool) -> bool:
    from lymph.console import progress_bar

    with progress_bar("ingest", None, enabled=progress) as update:
        state = {"done": 0}

        def step(done: int, total: int) -> None:
            update(advance=done - state["done"], total=total)
            state["done"] = done

        return ingest(data, cache_path, size=size, crop=crop, progress=step).cached


def _untrained(spec: Any, cache: ImageCache, out: Path, env: D.DistEnv) -> int:
    """A method without a network (``morphometry``): its writer measures every image
    (rank 0 only); the store's dim."""
    module = str(spec.writer).partition(":")[0]
    try:
        write = resolve(str(spec.writer))
    except ModuleNotFoundError as e:
        if e.name != module:
            raise
        raise LymphError(
            f"method: {spec.name} is not available in this installation "
            f"(module {module} is missing); use method ae"
        ) from None

    def work() -> int:
        from lymph.store import open_store

        write(cache, out)
        return open_store(out).dim

    # rank 0 alone (however long a large cohort takes); the others wait without a timeout
    return int(D.main_does(env, f"{spec.name}:{out}", work))


def run_combination(*, out: Path, data: str | Path | None, images: str | Path | None,
                    method: str, encoder: str | Path | None, device: str, size: int | None,
                    crop: int | None, cache: str | Path | None, progress: bool,
                    **train_args: Any) -> Any:
    """``lymph embed --method A+B`` (or ``--encoder COMBINED.pt``): every part into its own
    store, then the combined store ``out`` and (when training) ``OUT.encoder.pt``.

    ``size`` / ``crop`` apply to the trained parts' caches when ingesting ``data``;
    ``train_args`` (dim, epochs, batch_size, lr, seed, resume) go to the trained parts."""
    from lymph.store import open_store

    if cache is not None:
        raise LymphError(f"cache: not with a combined method ({method}); each part's "
                         "cache goes beside the store (OUT.<part>.images-<size>px.zarr)")
    with D.session(device) as env:  # held across the parts: torchrun's process group lives on
        # rank 0 reads the checkpoint; the other ranks get it
        given = D.main_decides(env, lambda: load_checkpoint(encoder)) if encoder is not None else None
        if given is not None:
            if not is_combination(str(given["method"])) or "parts" not in given:
                raise LymphError(f"`encoder` {encoder}: a {given['method']} checkpoint, not a "
                                 f"combined one; drop `method` {method} to use it alone")
            method = str(given["method"])
        parts = parts_of(method)
        summary = EmbedSummary(store=None, is_main=env.is_main, world=env.world)
        stores, records = [], []
        for k, part in enumerate(parts):
            p_out = part_store(out, part)
            rec = given["parts"][k] if given is not None else None
            if part == MORPHOMETRY:
                cs = rec["cache"] if rec is not None else {
                    "size": method_spec(MORPHOMETRY).default_size,
                    "crop": method_spec(MORPHOMETRY).default_crop}
                if rec is not None:
                    _check_morphometry_version(rec, encoder)
                s = run_embed(out=p_out, data=data, images=images, method=MORPHOMETRY,
                              device=device, size=int(cs["size"]), crop=cs.get("crop"),
                              progress=progress)
            else:
                enc = None
                if rec is not None:  # embed only: the part's weights back in a file
                    enc = _extract(rec, checkpoint_path(p_out)) if env.is_main else checkpoint_path(p_out)
                    D.barrier(env)
                s = run_embed(out=p_out, data=data, images=images, method=part, device=device,
                              encoder=enc, size=size, crop=crop, progress=progress,
                              **({} if enc is not None else train_args))
                summary.checkpoint = s.checkpoint
                summary.trained_epochs, summary.losses = s.trained_epochs, s.losses
                summary.train_seconds = s.train_seconds
                summary.train_images_per_s = s.train_images_per_s
                summary.loss_curve = s.loss_curve
                summary.cache, summary.cache_reused = s.cache, s.cache_reused
                summary.embed_seconds += s.embed_seconds
            summary.n_images, summary.n_patients = s.n_images, s.n_patients
            summary.notes.append(f"part {part}: {p_out} (dim {s.dim}, images {s.cache})")
            stores.append(p_out)
            if env.is_main and rec is None:
                from lymph.data.cache import open_cache

                c = open_cache(s.cache)  # type: ignore[arg-type]
                if part == MORPHOMETRY:
                    rec = _morphometry_record(c)
                else:
                    rec = {"method": part, "cache": {"size": c.size, "crop": c.crop},
                           "checkpoint": _part_checkpoint(load_checkpoint(s.checkpoint))}  # type: ignore[arg-type]
            records.append(rec)
        combined = Path(encoder) if encoder is not None else checkpoint_path(out)
        if env.is_main:
            if given is None:
                write_combined_checkpoint(combined, method, records)
            _concat(stores, out, combined, method)
            summary.dim = open_store(out).dim
        D.barrier(env)
        summary.checkpoint, summary.store = combined, out
        summary.notes.append(f"combined {method}: checkpoint {combined} (all parts, for "
                             "`lymph predict --data`)")
        return summary

"""The autoencoder's faster CPU layers compute what PyTorch's own do; the allocator tuning
stops large allocations from page-faulting again."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lymph.encoder.fastcpu.layers import ConvTranspose2d, mse_loss, normalise_channels
from lymph.encoder.model import AEConfig, ConvAutoencoder

CL = torch.channels_last


def _pair(cin: int, cout: int, **kw: object) -> tuple[nn.ConvTranspose2d, ConvTranspose2d]:
    torch.manual_seed(0)
    ref = nn.ConvTranspose2d(cin, cout, 3, stride=2, padding=1, output_padding=1, **kw)
    fast = ConvTranspose2d(cin, cout, 3, stride=2, padding=1, output_padding=1, **kw)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def _grads(mod: nn.Module, x: torch.Tensor, g: torch.Tensor) -> list[torch.Tensor]:
    x = x.detach().clone().requires_grad_()
    y = mod(x)
    y.backward(g)
    out = [y.detach(), x.grad]
    out += [p.grad.clone() for p in mod.parameters()]
    mod.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("layout", [torch.contiguous_format, CL])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_transpose_matches_pytorch_fp32(layout: torch.memory_format, bias: bool) -> None:
    ref, fast = _pair(8, 3, bias=bias)
    ref, fast = ref.to(memory_format=layout), fast.to(memory_format=layout)
    x = torch.randn(4, 8, 7, 7).contiguous(memory_format=layout)
    g = torch.randn(4, 3, 14, 14).contiguous(memory_format=layout)
    for a, b in zip(_grads(ref, x, g), _grads(fast, x, g)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert list(fast.state_dict()) == list(ref.state_dict())


def test_conv_transpose_matches_pytorch_under_bf16_autocast() -> None:
    ref, fast = _pair(16, 8)
    ref, fast = ref.to(memory_format=CL), fast.to(memory_format=CL)
    x = torch.randn(8, 16, 14, 14).contiguous(memory_format=CL)
    g = torch.randn(8, 8, 28, 28).to(torch.bfloat16).contiguous(memory_format=CL)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = _grads(ref, x, g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        b = _grads(fast, x, g)
    assert b[0].dtype == torch.bfloat16 and b[0].is_contiguous(memory_format=CL)
    assert [t.dtype for t in b[1:]] == [torch.float32] * 3  # fp32 input, weight and bias grads
    for ta, tb in zip(a, b):
        torch.testing.assert_close(tb.float(), ta.float(), rtol=2e-2, atol=2e-2)


def test_conv_transpose_falls_back_where_the_convolution_grad_does_not_apply() -> None:
    torch.manual_seed(0)
    ref = nn.ConvTranspose2d(4, 2, 3, stride=2, padding=1, dilation=2)
    fast = ConvTranspose2d(4, 2, 3, stride=2, padding=1, dilation=2)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, 4, 5, 5)
    assert not fast._conv_grad_applies(x)
    g = torch.randn_like(ref(x))
    for a, b in zip(_grads(ref, x, g), _grads(fast, x, g)):
        torch.testing.assert_close(b, a)


@pytest.mark.parametrize(("k", "s", "p", "op"), [(4, 2, 1, 0), (3, 3, 0, 2), (5, 2, 2, 1)])
def test_conv_transpose_matches_pytorch_for_other_geometries(k: int, s: int, p: int,
                                                             op: int) -> None:
    torch.manual_seed(0)
    ref = nn.ConvTranspose2d(4, 2, k, stride=s, padding=p, output_padding=op)
    fast = ConvTranspose2d(4, 2, k, stride=s, padding=p, output_padding=op)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, 4, 5, 5)
    assert fast._conv_grad_applies(x)
    g = torch.randn_like(ref(x))
    for a, b in zip(_grads(ref, x, g), _grads(fast, x, g)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_channels_last_autoencoder_computes_the_same_function() -> None:
    torch.manual_seed(0)
    m = ConvAutoencoder(AEConfig(dim=8, size=32))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref, code = m(x), m.encode(x)
    m = m.to(memory_format=CL)
    xc = x.contiguous(memory_format=CL)
    with torch.no_grad():
        out = m(xc)
        torch.testing.assert_close(m.encode(xc), code, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert out.is_contiguous(memory_format=CL)  # no layout change inside the decoder


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", [torch.contiguous_format, CL])
def test_mse_loss_matches_pytorch(dtype: torch.dtype, layout: torch.memory_format) -> None:
    torch.manual_seed(0)
    target = torch.randn(4, 3, 16, 16).contiguous(memory_format=layout)
    base = torch.randn(4, 3, 16, 16).to(dtype).contiguous(memory_format=layout)
    r1, r2 = base.clone().requires_grad_(), base.clone().requires_grad_()
    ref = F.mse_loss(r1.float(), target)
    ref.backward()
    loss = mse_loss(r2, target)
    loss.backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=0)
    assert r2.grad.dtype == dtype and r2.grad.stride() == base.stride()
    torch.testing.assert_close(r2.grad, r1.grad)
    assert torch.equal(r2.detach(), base)  # the input is not modified


def test_mse_loss_rejects_a_target_with_a_gradient() -> None:
    with pytest.raises(ValueError, match="target"):
        mse_loss(torch.zeros(2, 3), torch.zeros(2, 3, requires_grad=True))
    with pytest.raises(ValueError, match="shapes"):
        mse_loss(torch.zeros(2, 3), torch.zeros(3, 2))


@pytest.mark.parametrize("layout", [torch.contiguous_format, CL])
@pytest.mark.parametrize("side", [16, 6])  # 6: 36 pixels per image, rows of 4 pixels
def test_normalise_channels_is_bit_identical_to_the_broadcast(layout: torch.memory_format,
                                                             side: int) -> None:
    torch.manual_seed(0)
    px = torch.randint(0, 256, (3, 3, side, side), dtype=torch.uint8).contiguous(memory_format=layout)
    scale = torch.tensor([1 / 61.0, 1 / 47.0, 1 / 73.0])
    shift = torch.tensor([2.1, 1.7, 3.3])
    ref = px.to(torch.float32) * scale.view(1, 3, 1, 1) - shift.view(1, 3, 1, 1)
    out = normalise_channels(px, scale, shift)
    assert torch.equal(out, ref)
    assert out.stride() == ref.contiguous(memory_format=layout).stride()
    f = px.float()
    kept = f.clone()
    normalise_channels(f, scale, shift)
    assert torch.equal(f, kept)  # a float input is not modified in place


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning")
def test_keep_freed_memory_stops_repeated_page_faults() -> None:
    # the second 20 MiB allocation touches fresh pages with glibc's defaults (its first
    # one was mapped apart, the second comes from a grown heap); after the tuning it
    # reuses the first one's pages
    code = textwrap.dedent("""
        import ctypes, resource, sys
        from lymph.encoder.fastcpu.allocator import keep_freed_memory
        applied = keep_freed_memory() if sys.argv[1] == "tuned" else None
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc.restype = ctypes.c_void_p
        libc.free.argtypes = [ctypes.c_void_p]
        n, faults = 20 << 20, []
        for _ in range(2):
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            p = libc.malloc(n); ctypes.memset(p, 1, n); libc.free(p)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        print(applied, faults[1])
    """)
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt  # noqa: B018
    except (OSError, AttributeError):
        pytest.skip("not glibc")
    out = {}
    for mode in ("plain", "tuned"):
        proc = subprocess.run([sys.executable, "-c", code, mode], capture_output=True,
                              text=True, check=True)
        out[mode] = proc.stdout.split()
    assert out["tuned"][0] == "True"
    assert int(out["plain"][1]) > 1000  # 5,120 pages of 4 KiB
    assert int(out["tuned"][1]) < 100
    off = subprocess.run([sys.executable, "-c", code, "tuned"], capture_output=True, text=True,
                         check=True, env={**__import__("os").environ, "LYMPH_MALLOC_TUNING": "0"})
    assert off.stdout.split()[0] == "False"


def _stack() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(inplace=True),
                         ConvTranspose2d(8, 4, 3, stride=2, padding=1, output_padding=1),
                         nn.ReLU(inplace=True),
                         ConvTranspose2d(4, 3, 3, stride=2, padding=1, output_padding=1))


@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_run_sequential_fuses_conv_relu_and_computes_the_same(amp: torch.dtype | None) -> None:
    from lymph.encoder.fastcpu.layers import _FUSED_BF16, _fuses_relu, run_sequential

    ref, fast = _stack().to(memory_format=CL), _stack().to(memory_format=CL)
    x = torch.randn(4, 3, 16, 16).contiguous(memory_format=CL)
    if torch.backends.mkldnn.is_available():  # the fused path is the one under test
        assert _fuses_relu(fast[0], x)
    assert not _fuses_relu(fast[0], x.contiguous())  # NCHW: PyTorch's path
    outs = []
    for mod, run in ((ref, lambda m, t: m(t)), (fast, run_sequential)):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
            if amp is not None:  # fused in bf16 only where oneDNN has bf16 convolutions
                assert _fuses_relu(fast[0], xi) == _FUSED_BF16
            y = run(mod, xi)
        y.float().square().sum().backward()
        outs.append([y.detach().float(), xi.grad] + [p.grad for p in mod.parameters()])
    tol = {"rtol": 1e-5, "atol": 1e-5} if amp is None else {"rtol": 1e-2, "atol": 1e-2}
    for a, b in zip(*outs):
        torch.testing.assert_close(b.float(), a.float(), **tol)


def test_step_ablation_switches_each_fast_path_and_restores_them() -> None:
    from lymph.encoder.fastcpu import layers
    from lymph.encoder.bench import bench_step_ablation

    before = dict(layers.FAST)
    r = bench_step_ablation(batch_size=4, size=16, steps=1, rounds=1, malloc=True)
    assert layers.FAST == before
    assert set(r["step_s"]) == {"all", "none", "no_malloc_tuning",
                                *(f"no_{k}" for k in layers.FAST)}
    assert all(t > 0 for t in r["step_s"].values()) and r["slowdown"]["all"] == 1.0


def test_lymph_fast_layers_0_switches_every_fast_path_off() -> None:
    import os

    code = "from lymph.encoder.fastcpu.layers import FAST; print(sorted(FAST.items()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "LYMPH_FAST_LAYERS": "0"}).stdout
    from lymph.encoder.fastcpu.layers import FAST

    assert out.strip() == str(sorted(dict.fromkeys(FAST, False).items()))


def test_run_sequential_leaves_dilated_layers_to_pytorch() -> None:
    from lymph.encoder.fastcpu.layers import _fuses_relu, run_sequential

    torch.manual_seed(0)
    seq = nn.Sequential(nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1, dilation=2),
                        nn.ReLU()).to(memory_format=CL)
    x = torch.randn(2, 4, 6, 6).contiguous(memory_format=CL)
    assert not _fuses_relu(seq[0], x)
    outs = []
    for run in (lambda t: seq(t), lambda t: run_sequential(seq, t)):
        seq.zero_grad()
        xi = x.clone().requires_grad_()
        run(xi).square().sum().backward()
        outs.append([xi.grad, seq[0].weight.grad.clone()])
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a)

"""The loss mode of Efficient-PBAN (epban.models.loss_mode) against the model's own forward."""
import dataclasses

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from epban import EfficientPBAN, PBANConfig, settings
from epban._extension import triton_available, triton_interpret
from epban.models.loss_mode import (
    ConvReLU,
    CUDAGraphScorer,
    EpilogueBasicBlock,
    LossModeOptions,
    PBANScorer,
    StemConvReLU,
    fold_batchnorm,
    pban_for_loss,
)
from epban.ops import axial_attention as axial_ops
from epban.ops import bias_act as bias_act_ops
from epban.ops import max_pool as max_pool_ops
from epban.ops import normalise as normalise_ops
from epban.testing import randomise_inference_state
from helpers import count_calls

interpreted = pytest.mark.skipif(not (triton_available() and triton_interpret()), reason="needs TRITON_INTERPRET=1")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny shapes: OpenMP workers spinning on a busy machine cost more than they give."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _randomised(model):
    return randomise_inference_state(model, affine=True)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return _randomised(EfficientPBAN(PBANConfig.tiny()))


@pytest.fixture(scope="module")
def tiny_two_branches():
    """Two GMDC branches (k = 3, 5): the Triton interpreter runs it in seconds."""
    torch.manual_seed(0)
    return _randomised(EfficientPBAN(PBANConfig.tiny(gmdc_kernel_sizes=(3, 5))))


def _fused_gmdc(scorer):
    for gmdc in (scorer.block2.br1, scorer.block2.br2):
        gmdc.backend = "fused"
    return scorer


def _pair(b=2, h=64, w=80, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    hr = torch.rand(b, 3, h, w, generator=g)
    sr = (hr + 0.05 * torch.randn(hr.shape, generator=g)).clamp(0, 1)
    return sr.to(device), hr.to(device)


def _score_and_grad(f, sr, hr):
    sr = sr.detach().clone().requires_grad_()
    s = f(sr, hr)
    (g,) = torch.autograd.grad(s.sum(), sr)
    return s.detach(), g


def test_fold_batchnorm_is_exact_in_float32():
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(5, 7, 3, padding=1, bias=False), nn.BatchNorm2d(7)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    bn.eval()
    x = torch.randn(2, 5, 9, 11)
    torch.testing.assert_close(fold_batchnorm(conv, bn)(x), bn(conv(x)), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("channels_last", [True, False])
def test_float32_scores_and_gradients_match_the_model(tiny, channels_last):
    sr, hr = _pair()
    expected, expected_grad = _score_and_grad(tiny, sr, hr)
    scores, grad = _score_and_grad(pban_for_loss(tiny, channels_last=channels_last), sr, hr)
    assert scores.dtype == torch.float32 and scores.shape == (2,)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    assert (grad - expected_grad).abs().max() <= 1e-5 * expected_grad.abs().max()


def test_bfloat16_scores_within_1e2(tiny):
    """bf16 scores meet the 1e-2 bound; input gradients only agree in direction (see epban.models.loss_mode)."""
    sr, hr = _pair()
    expected, expected_grad = _score_and_grad(tiny, sr, hr)
    scores, grad = _score_and_grad(pban_for_loss(tiny, dtype=torch.bfloat16), sr, hr)
    assert scores.dtype == torch.float32
    assert (scores - expected).abs().max() <= 1e-2 * expected.abs().max()
    assert F.cosine_similarity(grad.flatten(), expected_grad.flatten(), dim=0) > 0.95


def test_model_is_left_untouched_and_scorer_is_frozen(tiny):
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    scorer = pban_for_loss(tiny)
    scorer.train()
    assert not any(m.training for m in scorer.modules())
    assert not any(p.requires_grad for p in scorer.parameters())
    assert isinstance(tiny.stem[1], nn.BatchNorm2d)
    assert all(torch.equal(before[k], v) for k, v in tiny.state_dict().items())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in scorer.modules())


def test_no_gradient_reaches_hr(tiny):
    sr, hr = _pair(b=1)
    sr.requires_grad_()
    hr.requires_grad_()
    pban_for_loss(tiny)(sr, hr).sum().backward()
    assert sr.grad is not None and hr.grad is None


def test_bad_arguments_are_value_errors(tiny):
    with pytest.raises(ValueError, match="EfficientPBAN"):
        pban_for_loss(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="dtype"):
        pban_for_loss(tiny, dtype=torch.float16)
    with pytest.raises(ValueError, match="same shape"):
        pban_for_loss(tiny)(torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 48))


def _epilogues(scorer):
    return [m for m in scorer.modules() if isinstance(m, (ConvReLU, EpilogueBasicBlock))]


@interpreted
@pytest.mark.parametrize("channels_last", [True, False])
def test_fused_epilogues_match_the_model(tiny, channels_last, monkeypatch):
    """The ResNet convs without bias, then bias_act (bias, downsample bias, residual, ReLU in one
    pass): the scores and input gradients of the model, every epilogue through the kernel."""
    calls = count_calls(monkeypatch, bias_act_ops, "_launch")
    pools = count_calls(monkeypatch, max_pool_ops, "_launch_pool")
    sr, hr = _pair(b=2, h=48, w=64)
    expected, expected_grad = _score_and_grad(tiny, sr, hr)
    scorer = pban_for_loss(tiny, channels_last=channels_last)
    modules = _epilogues(scorer)
    # stem conv, after_block1/2, and every BasicBlock of layer1-3
    assert len(modules) == 3 + sum(len(layer) for layer in (tiny.stem[4], tiny.stem[5], tiny.layer2_1))
    for m in modules:
        m.epilogue_backend = "fused"
    scores, grad = _score_and_grad(scorer, sr, hr)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    assert (grad - expected_grad).abs().max() <= 1e-5 * expected_grad.abs().max()
    # per path (sr, hr): after_block 1 each, two per BasicBlock (layer2_1 runs for both); the
    # stem's epilogue is in its pool's pass (fused_stem_pool)
    blocks = sum(len(layer) for layer in (tiny.stem[4], tiny.stem[5], tiny.layer2_1))
    assert len(calls) == 2 * (1 + 2 * blocks) and len(pools) == 2


@pytest.mark.parametrize("dtype, channels", [(torch.float32, 4), (torch.bfloat16, 8)])
def test_padded_stem_input_gradient_is_the_same(tiny, dtype, channels, monkeypatch):
    """The stem conv's input gradient from its weight zero-padded to 16 bytes of input channels
    (as on CUDA), cut back to 3: the same scores and input gradients as without."""
    seen = []
    conv2d_input = torch.nn.grad.conv2d_input
    monkeypatch.setattr(torch.nn.grad, "conv2d_input",
                        lambda size, w, *a: seen.append(tuple(w.shape)) or conv2d_input(size, w, *a))
    sr, hr = _pair(b=2, h=48, w=64)
    plain = pban_for_loss(tiny, dtype=dtype, stem_pad=False)
    padded = pban_for_loss(tiny, dtype=dtype)
    stem = padded.trunk.stem
    assert isinstance(stem, StemConvReLU) and stem.pad_devices == {"cuda"}
    stem.pad_devices = {"cpu"}
    expected, expected_grad = _score_and_grad(plain, sr, hr)
    scores, grad = _score_and_grad(padded, sr, hr)
    assert seen == [(tiny.stem[0].out_channels, channels, 7, 7)]  # once: sr's path (hr needs no gradient)
    if dtype == torch.float32:
        torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
        assert (grad - expected_grad).abs().max() <= 1e-5 * expected_grad.abs().max()
    else:  # the bias is added after the bf16 rounding of the conv: ReLU masks move (see epban.models.loss_mode)
        assert (scores - expected).abs().max() <= 1e-2 * expected.abs().max()
        assert F.cosine_similarity(grad.flatten(), expected_grad.flatten(), dim=0) > 0.95


def test_fused_epilogue_switch(tiny):
    assert all(m.fused_epilogue for m in _epilogues(pban_for_loss(tiny)))
    assert not any(m.fused_epilogue for m in _epilogues(pban_for_loss(tiny, fused_epilogue=False)))
    assert pban_for_loss(tiny, stem_pad=False).trunk.stem.pad_devices == set()


@interpreted
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("fused_stem_pool", [True, False])
def test_fused_residual_grad_gives_autograds_gradient(channels_last, fused_stem_pool, monkeypatch):
    """With the fused epilogues, each ResNet layer runs as one autograd node whose backward
    fuses a block's branch sum with the previous block's ReLU mask (relu_grad_sum, through the
    kernel at every block boundary): the same scores and input gradient as block-by-block
    autograd, and as the model. Layers of 2, 3 and 2 blocks (the tiny preset's have one: no
    boundary), the first block of layers 2 and 3 with a downsample; the stem's epilogue and
    max-pool in the chain (masked at the pooled output instead of the stem's output), as one
    gather with layer1's first sum when ``fused_stem_pool``."""
    torch.manual_seed(0)
    tiny = _randomised(EfficientPBAN(PBANConfig.tiny(blocks=(2, 3, 2))))
    sums = count_calls(monkeypatch, bias_act_ops, "_launch_relu_grad_sum")
    pool_grads = count_calls(monkeypatch, max_pool_ops, "_launch_grad")
    sr, hr = _pair(b=2, h=48, w=64)
    results = {}
    for fused in (True, False):
        scorer = pban_for_loss(tiny, channels_last=channels_last, fused_residual_grad=fused,
                               fused_stem_pool=fused_stem_pool and fused)
        for m in _epilogues(scorer):
            m.epilogue_backend = "fused"
        results[fused] = _score_and_grad(scorer, sr, hr)
    # sr's path only: one node from the stem's epilogue to layer3's last block, one sum at every
    # block boundary (across layers too) and at the pooled stem output (layer1's input), the
    # last in the pool's backward gather when fused_stem_pool
    assert len(sums) == (2 + 3 + 2 - 1) + (0 if fused_stem_pool else 1)
    assert len(pool_grads) == (1 if fused_stem_pool else 0)
    (scores, grad), (plain_scores, plain_grad) = results[True], results[False]
    torch.testing.assert_close(scores, plain_scores, atol=0, rtol=0)
    torch.testing.assert_close(grad, plain_grad, atol=1e-7 * plain_grad.abs().max().item(), rtol=1e-6)
    expected, expected_grad = _score_and_grad(tiny, sr, hr)
    assert (grad - expected_grad).abs().max() <= 1e-5 * expected_grad.abs().max()


@interpreted
def test_fused_residual_grad_refuses_a_second_derivative(tiny):
    scorer = pban_for_loss(tiny)
    for m in _epilogues(scorer):
        m.epilogue_backend = "fused"
    sr, hr = _pair(b=1, h=32, w=32)
    sr.requires_grad_()
    (grad,) = torch.autograd.grad(scorer(sr, hr).sum(), sr, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad.sum().backward()


@interpreted
@pytest.mark.parametrize("channels_last", [True, False])
def test_fused_stem_pool_without_the_residual_chain(tiny, channels_last, monkeypatch):
    """fused_stem_pool alone (autograd block by block): the HR and SR trunks both take the one-pass
    stem tail, autograd its backward gather; scores and input gradients as the separate kernels'."""
    pools = count_calls(monkeypatch, max_pool_ops, "_launch_pool")
    pool_grads = count_calls(monkeypatch, max_pool_ops, "_launch_grad")
    sr, hr = _pair(b=2, h=48, w=64)
    results = {}
    for fused in (True, False):
        scorer = pban_for_loss(tiny, channels_last=channels_last, fused_residual_grad=False, fused_stem_pool=fused)
        for m in _epilogues(scorer):
            m.epilogue_backend = "fused"
        results[fused] = _score_and_grad(scorer, sr, hr)
    assert len(pools) == 2 and len(pool_grads) == 1
    (scores, grad), (plain_scores, plain_grad) = results[True], results[False]
    torch.testing.assert_close(scores, plain_scores, atol=0, rtol=0)
    torch.testing.assert_close(grad, plain_grad, atol=1e-7 * plain_grad.abs().max().item(), rtol=1e-6)


@interpreted
def test_fused_stem_pool_keeps_no_stem_sized_tensor(tiny):
    """What the step keeps for its backward: with the fused stem pool, no tensor of the stem's
    output size (its ReLU output) and no int64 pool indices, only int8 window positions."""
    sr, hr = _pair(b=2, h=48, w=64)
    stem_shape = (2, tiny.stem[0].out_channels, 24, 32)
    kept = {}
    for fused in (True, False):
        scorer = pban_for_loss(tiny, fused_stem_pool=fused)
        for m in _epilogues(scorer):
            m.epilogue_backend = "fused"
        saved = kept[fused] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((tuple(t.shape), t.dtype)) or t,
                                                      lambda t: t):
            scorer(sr.clone().requires_grad_(), hr)
    pooled = (2, tiny.stem[0].out_channels, 12, 16)
    assert not any(shape == stem_shape for shape, _ in kept[True])
    assert (pooled, torch.int8) in kept[True] and (pooled, torch.int64) not in kept[True]
    assert (stem_shape, torch.float32) in kept[False] and (pooled, torch.int64) in kept[False]


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_input_gives_the_same_scores_and_gradients(tiny, dtype, monkeypatch):
    """fused_input: both images normalised, cast and laid out in one pass each, the SR image's
    gradient back in one: the same scores and input gradients as PyTorch's ops (float32 exactly;
    bf16 within the interpreter's one-ulp truncation of the cast)."""
    calls = count_calls(monkeypatch, normalise_ops, "_launch_normalise")
    grads = count_calls(monkeypatch, normalise_ops, "_launch_grad")
    sr, hr = _pair(b=2, h=48, w=64)
    results = {}
    for fused in (True, False):
        scorer = pban_for_loss(tiny, dtype=dtype, fused_input=fused)
        for m in _epilogues(scorer):
            m.epilogue_backend = "fused"
        results[fused] = _score_and_grad(scorer, sr, hr)
    assert len(calls) == 2 and len(grads) == 1
    (scores, grad), (plain_scores, plain_grad) = results[True], results[False]
    if dtype == torch.float32:
        torch.testing.assert_close(scores, plain_scores, atol=0, rtol=0)
        torch.testing.assert_close(grad, plain_grad, atol=0, rtol=0)
    else:
        assert (scores - plain_scores).abs().max() <= 1e-2 * plain_scores.abs().max()


def test_fused_stem_pool_and_input_switches(tiny):
    assert pban_for_loss(tiny).trunk.fused_stem_pool
    assert not pban_for_loss(tiny, fused_stem_pool=False).trunk.fused_stem_pool
    assert pban_for_loss(tiny).options.fused_input and not pban_for_loss(tiny, fused_input=False).options.fused_input


def test_fused_residual_grad_switch(tiny):
    assert pban_for_loss(tiny).trunk.fused_residual_grad
    assert not pban_for_loss(tiny, fused_residual_grad=False).trunk.fused_residual_grad


def test_options_are_one_keyword_only_dataclass(tiny):
    """pban_for_loss(model, options) and pban_for_loss(model, **fields) build the same scorer;
    keywords replace the options' fields; the options are frozen and keyword-only, and an
    unknown one is refused."""
    options = LossModeOptions(fused_epilogue=False, batch_gates=False)
    assert pban_for_loss(tiny, options).options == options
    assert pban_for_loss(tiny, fused_epilogue=False, batch_gates=False).options == options
    assert pban_for_loss(tiny, options, batch_gates=True).options == dataclasses.replace(options, batch_gates=True)
    assert isinstance(PBANScorer(tiny), PBANScorer) and PBANScorer(tiny).options == LossModeOptions()
    with pytest.raises(TypeError):
        LossModeOptions(torch.bfloat16)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.dtype = torch.bfloat16
    with pytest.raises(TypeError, match="fused_everything"):
        pban_for_loss(tiny, fused_everything=True)
    sr, hr = _pair(b=1, h=32, w=32)
    with torch.no_grad():
        torch.testing.assert_close(pban_for_loss(tiny, options)(sr, hr), tiny(sr, hr), atol=1e-5, rtol=1e-5)


def test_the_model_carries_no_loss_mode():
    """The loss mode builds its scorer from a model; the model has no loss-mode hooks."""
    model = EfficientPBAN(PBANConfig.tiny())
    assert not hasattr(model, "for_loss")
    assert not hasattr(model.block2, "batch_gates") and not hasattr(model.block2.SE, "spatial_mean")


def test_batched_gates_call_se_once_with_the_same_values(tiny):
    """batch_gates: one SE call on both directions' outputs (stacked along the batch); scores
    and input gradients equal the per-direction calls'."""
    sr, hr = _pair(b=3)
    calls = []
    scorers = {}
    for batched in (True, False):
        scorers[batched] = pban_for_loss(tiny, batch_gates=batched)
        se = scorers[batched].block2.SE
        se.register_forward_hook(lambda module, args, out, batched=batched: calls.append((batched, args[0].shape[0])))
    batched_scores, batched_grad = _score_and_grad(scorers[True], sr, hr)
    scores, grad = _score_and_grad(scorers[False], sr, hr)
    assert calls == [(True, 6), (False, 3), (False, 3)]
    torch.testing.assert_close(batched_scores, scores, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(batched_grad, grad, atol=1e-6 * grad.abs().max().item(), rtol=1e-5)
    assert pban_for_loss(tiny).block2.batch_gates


@interpreted
def test_fused_gmdc_in_the_loss_mode_matches_the_model(tiny_two_branches):
    sr, hr = _pair(b=1, h=48, w=64)
    expected, expected_grad = _score_and_grad(tiny_two_branches, sr, hr)
    scores, grad = _score_and_grad(_fused_gmdc(pban_for_loss(tiny_two_branches)), sr, hr)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    assert (grad - expected_grad).abs().max() <= 1e-5 * expected_grad.abs().max()


@interpreted
def test_fused_attention_reads_the_loss_modes_channels_last(tiny_two_branches, monkeypatch):
    """The GPU path of the loss mode, interpreted: fused GMDC and fused attention on channels_last
    features. The attention reads q, k, v as they are (no layout copy, forward or backward:
    the channel gate's mean keeps the gradient channels_last) and the scores and gradients are
    the model's."""
    sr, hr = _pair(b=1, h=48, w=64)
    expected, expected_grad = _score_and_grad(tiny_two_branches, sr, hr)
    scorer = _fused_gmdc(pban_for_loss(tiny_two_branches))
    scorer.block2.attention_backend = "fused"
    layouts = []
    real_forward, real_backward = axial_ops.axial_forward, axial_ops.axial_backward
    channels_last = lambda t: t.is_contiguous(memory_format=torch.channels_last)  # noqa: E731

    def forward(qs, *args, **kwargs):
        layouts.append(("forward", channels_last(qs[0])))
        return real_forward(qs, *args, **kwargs)

    def backward(qs, ks, vs, grads, *args, **kwargs):
        layouts.append(("backward", all(channels_last(g) for g in grads)))
        return real_backward(qs, ks, vs, grads, *args, **kwargs)

    monkeypatch.setattr(axial_ops, "axial_forward", forward)
    monkeypatch.setattr(axial_ops, "axial_backward", backward)
    copies = []
    real_contiguous = torch.Tensor.contiguous
    monkeypatch.setattr(torch.Tensor, "contiguous",
                        lambda t, *a, **k: copies.append(not t.is_contiguous(*a, **k)) or real_contiguous(t, *a, **k))
    scores, grad = _score_and_grad(scorer, sr, hr)
    monkeypatch.undo()
    assert layouts == [("forward", True), ("backward", True)] and not any(copies)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    assert (grad - expected_grad).abs().max() <= 1e-5 * expected_grad.abs().max()


@interpreted
@pytest.mark.parametrize("fused_epilogues", [False, True])
def test_compiles_without_breaking_on_our_ops(tiny_two_branches, fused_epilogues, monkeypatch):
    # aot_eager traces through the fused ops' fake implementations and autograd formulas: the
    # deformable conv, and with fused_epilogues bias_act, the stem pool and the normalisation.
    launches = [count_calls(monkeypatch, ops, name) for ops, name in (
        (max_pool_ops, "_launch_pool"), (max_pool_ops, "_launch_grad"), (normalise_ops, "_launch_normalise"),
        (normalise_ops, "_launch_grad"))]
    sr, hr = _pair(b=1, h=32, w=32)
    expected, expected_grad = _score_and_grad(tiny_two_branches, sr, hr)
    scorer = _fused_gmdc(pban_for_loss(tiny_two_branches, compile={"backend": "aot_eager", "fullgraph": False}))
    if fused_epilogues:
        for m in _epilogues(scorer):
            m.epilogue_backend = "fused"
    scores, grad = _score_and_grad(scorer, sr, hr)
    assert all(launches) == fused_epilogues
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    assert (grad - expected_grad).abs().max() <= 1e-5 * expected_grad.abs().max()


# ------------------------------------------------------------------------------------------- CUDA
@pytest.fixture(scope="module")
def official_cuda():
    torch.manual_seed(0)
    return _randomised(EfficientPBAN(PBANConfig.official())).cuda()


@pytest.fixture
def no_tf32():
    """cuDNN may run float32 convolutions in TF32 by default: off, so that 1e-5 means float32."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_loss_mode_matches_the_reference(official_cuda, dtype, no_tf32):
    sr, hr = _pair(b=2, h=256, w=256, device="cuda")
    official_cuda.attention_backend = "reference"
    for m in (official_cuda.block2.br1, official_cuda.block2.br2):
        m.backend = "reference"
    try:
        expected, expected_grad = _score_and_grad(official_cuda, sr, hr)
    finally:
        official_cuda.attention_backend = "auto"
        for m in (official_cuda.block2.br1, official_cuda.block2.br2):
            m.backend = "auto"
    scores, grad = _score_and_grad(pban_for_loss(official_cuda, dtype=dtype), sr, hr)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert (scores - expected).abs().max() <= tol * max(1.0, expected.abs().max().item())
    if dtype == torch.float32:
        # Scores agree to ~1e-8, but on the official width the input gradient is a piecewise
        # function (ReLU masks, max-pool winners) that float32 rounding differences between two
        # summation orders move (~3e-4 relative on a GPU), hence not 1e-5.
        assert (grad - expected_grad).norm() <= 2e-3 * expected_grad.norm()
    else:
        assert F.cosine_similarity(grad.flatten(), expected_grad.flatten(), dim=0) > 0.9


@pytest.mark.cuda
def test_cuda_graph_replays_match_eager(official_cuda, no_tf32):
    scorer = pban_for_loss(official_cuda)
    graphed = pban_for_loss(official_cuda, cuda_graph=True)
    for seed in (0, 1):  # the second call replays the graph captured by the first
        sr, hr = _pair(b=2, h=128, w=128, seed=seed, device="cuda")
        expected, expected_grad = _score_and_grad(scorer, sr, hr)
        scores, grad = _score_and_grad(graphed, sr, hr)
        torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grad, expected_grad, atol=1e-6, rtol=1e-4)
    # one shape captured: its attention backend was picked by timing both
    assert [c[0] in ("fused", "reference") for c in graphed.attention_choice.values()] == [True]
    assert official_cuda.attention_backend == "auto"


@pytest.mark.cuda
@pytest.mark.skipif(not settings.test_compile(), reason="set EPBAN_TEST_COMPILE=1 (Inductor compiles for minutes)")
def test_cuda_torch_compile(official_cuda, no_tf32):
    sr, hr = _pair(b=1, h=128, w=128, device="cuda")
    expected, expected_grad = _score_and_grad(pban_for_loss(official_cuda), sr, hr)
    scores, grad = _score_and_grad(pban_for_loss(official_cuda, compile=True), sr, hr)
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=1e-3)


def test_graph_scorer_keeps_the_faster_attention_backend(tiny, monkeypatch):
    """The capture-and-time selection of CUDAGraphScorer, its CUDA parts replaced: the faster
    backend is kept and recorded, a backend that fails to capture is skipped, and the model's
    own setting is left at "auto"."""
    monkeypatch.setattr(axial_ops, "fused_axial_available", lambda device, dtype=None: True)
    graphed = CUDAGraphScorer(pban_for_loss(tiny))
    block = graphed.scorer.block2
    timings = {"fused": 2.0, "reference": 1.0}
    captured = []

    def fake_capture(sr, hr):
        backend = block.attention_backend
        if backend in failing:
            raise RuntimeError("cannot capture")
        captured.append(backend)
        return backend  # stands for the graphed callable

    monkeypatch.setattr(graphed, "_capture", fake_capture)
    monkeypatch.setattr(graphed, "_replay_ms", lambda fn, sr, hr: timings[fn])
    sr, hr = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
    for failing, expected in ((set(), "reference"), ({"reference"}, "fused")):
        captured.clear()
        graphed.attention_choice.clear()
        assert graphed._capture_fastest(sr, hr, key="k") == expected
        assert graphed.attention_choice["k"][0] == expected
        assert block.attention_backend == "auto"
    timings.update(fused=0.5)
    failing = set()
    assert graphed._capture_fastest(sr, hr, key="k") == "fused"
    block.attention_backend = "reference"  # a user's explicit choice is not second-guessed
    graphed.attention_choice.clear()
    assert graphed._capture_fastest(sr, hr, key="k") == "reference" and not graphed.attention_choice


def test_gather_path_unpacks_the_frozen_weights_once(tiny):
    """The CPU (gather) path reads per-branch weights: made once from the packed ones, equal
    to the model's, and remade when the scorer moves to another dtype."""
    scorer = pban_for_loss(tiny)
    gmdc = scorer.block2.br1
    sr, hr = _pair(b=1, h=32, w=32)
    scorer(sr, hr)
    weights, biases = gmdc._unpacked_weights()
    scorer(sr, hr)
    again, _ = gmdc._unpacked_weights()
    assert all(a is b for a, b in zip(weights, again))
    for w, ref in zip(weights, tiny.block2.br1.weights):
        assert w.is_contiguous() and torch.equal(w, ref)
    for b, ref in zip(biases, tiny.block2.br1.biases):
        assert torch.equal(b, ref)
    gmdc.double()
    assert all(w.dtype == torch.float64 for w in gmdc._unpacked_weights()[0])


def test_cudnn_benchmark_only_while_capturing(tiny, monkeypatch):
    """cudnn_benchmark=True: cuDNN's benchmark flag is on while the step is captured (its
    warm-up runs choose the algorithms the graph keeps) and restored afterwards; it needs
    cuda_graph without compile. The CUDA capture itself is replaced (no GPU here)."""
    seen = []
    monkeypatch.setattr(torch.cuda, "make_graphed_callables",
                        lambda fn, args: seen.append(torch.backends.cudnn.benchmark) or fn)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    sr, hr = _pair(b=1, h=32, w=32)
    for flag in (True, False):
        graphed = pban_for_loss(tiny, cuda_graph=True, cudnn_benchmark=flag)
        graphed._capture(sr, hr)
        assert torch.backends.cudnn.benchmark is False
    assert seen == [True, False]
    with pytest.raises(ValueError, match="cuda_graph"):
        pban_for_loss(tiny, cudnn_benchmark=True)
    with pytest.raises(ValueError, match="cuda_graph"):
        pban_for_loss(tiny, cuda_graph=True, compile=True, cudnn_benchmark=True)
    assert not pban_for_loss(tiny, cuda_graph=True).cudnn_benchmark  # off by default

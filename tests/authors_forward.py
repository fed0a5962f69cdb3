"""An independent, functional transcription of the authors' forward pass (docs/architecture.md).

Written from the specification without the package's modules: plain functional calls on
a state dict with the authors' names, and their whole-batch attention std. Used only by
the tests, to pin EfficientPBAN's wiring to the specification.
"""
import torch
import torch.nn.functional as F
from torchvision.ops import deform_conv2d


def _bn(x, sd, p):
    return F.batch_norm(x, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"], sd[p + ".bias"],
                        training=False, eps=1e-5)


def _basic_block(x, sd, p, stride):
    out = F.relu(_bn(F.conv2d(x, sd[p + ".conv1.weight"], stride=stride, padding=1), sd, p + ".bn1"))
    out = _bn(F.conv2d(out, sd[p + ".conv2.weight"], padding=1), sd, p + ".bn2")
    if p + ".downsample.0.weight" in sd:
        x = _bn(F.conv2d(x, sd[p + ".downsample.0.weight"], stride=stride), sd, p + ".downsample.1")
    return F.relu(out + x)


def _layer(x, sd, p, stride):
    i = 0
    while f"{p}.{i}.conv1.weight" in sd:
        x = _basic_block(x, sd, f"{p}.{i}", stride if i == 0 else 1)
        i += 1
    return x


def _conv(x, sd, p, **kw):
    return F.conv2d(x, sd[p + ".weight"], sd[p + ".bias"], **kw)


def _gmdc(x, sd, p):
    outs = []
    for i, k in enumerate((3, 5, 7, 9)):
        offset = _conv(x, sd, f"{p}.param_generators.{i}", padding=1)
        outs.append(deform_conv2d(x, offset, sd[f"{p}.weights.{i}"], sd[f"{p}.biases.{i}"], padding=k // 2))
    return _conv(torch.cat(outs, 1), sd, p + ".merge_conv")


def _attention_pass(q, k, v):
    # (B, C, L, N): sequences of length N; whole-batch std, as the authors' code.
    s = torch.einsum("bcln,bclm->blnm", q, k)
    a = torch.softmax(s / (s.std() + 1e-6), dim=-1)
    return torch.einsum("bcln,blnm->bclm", v, a)


def _axial(q, k, v):
    row = _attention_pass(q, k, v)
    col = _attention_pass(q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3)).transpose(2, 3)
    return (row + col) / 2


def _se(x, sd):
    p = "block2.SE"
    z = torch.tanh(_conv(x, sd, p + ".pixelse.0", padding=1))
    z = torch.tanh(F.pixel_shuffle(_conv(z, sd, p + ".pixelse.2", padding=1), 3))
    z = torch.sigmoid(_conv(z, sd, p + ".pixelse.5", stride=3, padding=1))
    y = x.mean(dim=(2, 3), keepdim=True)
    y = torch.tanh(_conv(y, sd, p + ".subchannel_before.0", groups=4))
    b, c3 = y.shape[:2]
    y = y.view(b, 3, c3 // 3, 1, 1).permute(0, 2, 3, 4, 1)
    y = F.linear(y, sd[p + ".shuffle.linear.weight"], sd[p + ".shuffle.linear.bias"])
    y = y.permute(0, 1, 4, 2, 3).reshape(b, c3, 1, 1)
    y = torch.sigmoid(_conv(y, sd, p + ".subchannel_after.0"))
    return x * z * y


def authors_forward(sd, sr, hr):
    """Scores (B,) for already-normalised inputs."""
    feats = []
    for img, layer3 in ((sr, "layer2_1"), (hr, "layer2_2")):
        x = F.relu(_bn(F.conv2d(img, sd["stem.0.weight"], stride=2, padding=3), sd, "stem.1"))
        x = F.max_pool2d(x, 3, 2, 1)
        x = _layer(_layer(x, sd, "stem.4", 1), sd, "stem.5", 2)
        feats.append(_layer(x, sd, layer3, 2))
    f_sr, f_hr = feats
    b2 = "block2"
    q1, k1, v1 = _gmdc(_conv(f_sr, sd, b2 + ".q1", padding=1), sd, b2 + ".br1"), _conv(f_sr, sd, b2 + ".k1", padding=1), _conv(f_sr, sd, b2 + ".v1", padding=1)
    q2, k2, v2 = _gmdc(_conv(f_hr, sd, b2 + ".q2", padding=1), sd, b2 + ".br2"), _conv(f_hr, sd, b2 + ".k2", padding=1), _conv(f_hr, sd, b2 + ".v2", padding=1)
    out1 = _se(_axial(q1, k2, v1), sd) + f_sr
    out2 = _se(_axial(q2, k1, v2), sd) + f_hr
    heads = []
    for out, ab, fc_a, fc_b in ((out1, "after_block1", "fc11", "fc21"), (out2, "after_block2", "fc12", "fc22")):
        x = F.relu(_bn(_conv(out, sd, f"{b2}.{ab}.0", stride=2, padding=1), sd, f"{b2}.{ab}.1"))
        x = F.adaptive_avg_pool2d(x, (2, 2)).flatten(1)
        x = F.relu(F.linear(x, sd[fc_a + ".weight"], sd[fc_a + ".bias"]))
        heads.append(F.relu(F.linear(x, sd[fc_b + ".weight"], sd[fc_b + ".bias"])))
    x = F.linear(torch.cat(heads, 1), sd["fc.weight"], sd["fc.bias"])
    return F.linear(x, sd["out.weight"], sd["out.bias"]).squeeze(1)

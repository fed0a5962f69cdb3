"""Pictures and tables of SR results: side-by-side crops, the ablation table and figure."""
from __future__ import annotations

from pathlib import Path

import torch

from epban.sr.imresize import bicubic_upsample, quantize

METRIC_LABELS = {"psnr_y": "PSNR-Y (dB)", "ssim_y": "SSIM-Y", "pban_score": "PBAN score", "lpips": "LPIPS"}


def centre_crop_box(h: int, w: int, size: int, scale: int) -> tuple[int, int, int]:
    """(top, left, side) of a centred HR crop of at most ``size`` pixels, aligned to the scale grid."""
    side = min(size, h, w)
    side -= side % scale
    return ((h - side) // 2) // scale * scale, ((w - side) // 2) // scale * scale, side


@torch.no_grad()
def comparison_crops(columns: dict[str, torch.Tensor], crop: int, scale: int) -> dict[str, torch.Tensor]:
    """The same centred crop of each (3, H, W) image."""
    h, w = next(iter(columns.values())).shape[-2:]
    top, left, side = centre_crop_box(h, w, crop, scale)
    return {k: v[..., top : top + side, left : left + side].float().cpu().clamp(0, 1) for k, v in columns.items()}


def save_grid(path: str | Path, rows: list[dict[str, torch.Tensor]], *, title: str | None = None,
              row_labels: list[str] | None = None, captions: list[dict[str, str]] | None = None) -> Path:
    """A grid of image crops (one dict of column -> (3, h, w) per row) with column titles, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = list(rows[0])
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(2.6 * len(cols), 3.2 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        for c, name in enumerate(cols):
            ax = axes[r][c]
            ax.imshow(row[name].permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            label = name if r == 0 else ""
            if captions and captions[r].get(name):
                label = f"{label}\n{captions[r][name]}" if label else captions[r][name]
            ax.set_title(label, fontsize=8)
            if c == 0 and row_labels:
                ax.set_ylabel(row_labels[r], fontsize=8)
    top = 1.0
    if title:
        fig.suptitle(title, fontsize=9)
        top = 1.0 - 0.3 / fig.get_figheight()  # room for the title above the column titles
    fig.tight_layout(rect=(0, 0, 1, top))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _caption(m: dict | None) -> str:
    if not m:
        return ""
    parts = [f"{m['psnr_y']:.2f} dB", f"SSIM {m['ssim_y']:.3f}"]
    if "pban_score" in m:
        parts.append(f"PBAN {m['pban_score']:.3f}")
    return " / ".join(parts)


@torch.no_grad()
def save_side_by_side(path, net, dataset, device, scale: int, *, crop: int = 128, max_images: int = 3,
                      metrics: dict | None = None, baseline: dict | None = None, amp=False, channels_last=False,
                      title: str | None = None) -> Path:
    """Bicubic / SR / HR crops of the first validation images, with per-image metrics when given."""
    from epban.sr.evaluate import super_resolve

    rows, captions, labels = [], [], []
    for i in range(min(max_images, len(dataset))):
        item = dataset[i]
        lr, hr = item["lr"][None].to(device), item["hr"][None].to(device)
        sr = super_resolve(net, lr, amp=amp, channels_last=channels_last)
        bic = quantize(bicubic_upsample(lr, scale))
        rows.append(comparison_crops({"bicubic": bic[0], "SR": sr[0], "HR": hr[0]}, crop, scale))
        name = item["name"]
        labels.append(name)
        captions.append({
            "bicubic": _caption((baseline or {}).get("images", {}).get(name)),
            "SR": _caption((metrics or {}).get("images", {}).get(name)),
        })
    return save_grid(path, rows, title=title, row_labels=labels, captions=captions)


def ablation_markdown(results: list[dict], baseline: dict) -> str:
    """A markdown table: one row per setting (and bicubic), mean validation metrics."""
    keys = [k for k in METRIC_LABELS if k in baseline["mean"]]
    head = "| setting | w_L1 | w_SSIM | w_PBAN | " + " | ".join(METRIC_LABELS[k] for k in keys) + " |"
    lines = [head, "|" + "---|" * (4 + len(keys))]
    lines.append("| bicubic | - | - | - | " + " | ".join(f"{baseline['mean'][k]:.4f}" for k in keys) + " |")
    for r in results:
        w = r["weights"]
        vals = " | ".join(f"{r['eval']['mean'][k]:.4f}" for k in keys)
        lines.append(f"| {r['setting']} | {w['l1']:g} | {w['ssim']:g} | {w['pban']:g} | {vals} |")
    return "\n".join(lines) + "\n"

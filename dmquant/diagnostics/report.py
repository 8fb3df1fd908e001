"""What ``dmquant inspect`` writes from its numbers: the likely cause of each layer's error, ``report.md``
and two PIL plots (per-layer SQNR bars, per-step input ranges of the worst layers).

The causes are read off the statistics with fixed thresholds (:data:`THRESHOLDS`); they point at where
to look, they do not prove anything.
"""

from __future__ import annotations

import math

from PIL import Image, ImageDraw

WORST = 15
THRESHOLDS = {
    "weights_margin_db": 3.0,  # weights alone lose this much more than activations alone: "weights"
    "step_variation": 3.0,  # largest / smallest per-step input range
    "cfg_ratio": 1.5,  # range of one CFG half over the other's, at the worst step
    "clipped_fraction": 1e-3,  # held-out values the calibrated static grid clips
    "peak_over_calibrated": 1.5,  # held-out peak over the calibrated range's end
    "peak_over_p999": 3.0,  # the input's peak |x| over its 99.9th percentile |x| (a long tail)
    "peak_over_rms": 12.0,  # the input's peak |x| over its RMS (per-tensor static scales only)
    "outlier_channels": 8.0,  # largest channel peak over the median channel peak
    "concat_ratio": 3.0,  # peak of one skip-concat part over the other's
    "token_peak_over_rms": 6.0,  # a token's peak over its RMS (what a per-token scale has to cover)
}
COLORS = {"weights": (60, 110, 220), "activations": (235, 140, 40), "both": (200, 40, 40)}
BRANCH_COLORS = [(40, 80, 220), (220, 60, 60), (40, 160, 60), (150, 60, 180)]


def _db(value: float | None) -> float:
    return math.inf if value is None else value


def _fmt_db(value: float | None) -> str:
    return "exact" if value is None else f"{value:.1f}"


def diagnose(layer: dict) -> list[str]:
    """The likely causes of one layer's error (``inspect.json``'s layer entry), most telling first."""
    t = THRESHOLDS
    s = layer["sqnr_db"]
    w, a = _db(s["weights"]), _db(s["activations"])
    if w == math.inf and a == math.inf:
        return ["exact"]
    causes: list[str] = []
    if w + t["weights_margin_db"] < a:
        causes.append(f"weights (W{layer['weight_bits']} alone {w:.1f} dB, activations alone {_fmt_db(s['activations'])} dB)")
        return causes
    evidence: list[tuple[float, str]] = []
    ranges = layer.get("ranges", {})
    r = ranges.get("step_variation")
    if r is not None and r >= t["step_variation"]:
        evidence.append((r / t["step_variation"], f"activation range varies {r:.0f}x over steps"))
    r = ranges.get("cfg_ratio")
    if r is not None and r >= t["cfg_ratio"]:
        evidence.append((r / t["cfg_ratio"], f"range differs {r:.1f}x between the CFG halves"))
    cal = layer.get("calibrated")
    if cal:
        c, p = cal.get("clipped_fraction") or 0.0, cal.get("peak_over_calibrated") or 0.0
        if c >= t["clipped_fraction"] or p >= t["peak_over_calibrated"]:
            score = max(c / t["clipped_fraction"], p / t["peak_over_calibrated"])
            evidence.append((score, f"held-out inputs exceed the calibrated range ({100 * c:.2g}% clipped, peak "
                                    f"{p:.1f}x the range)"))
    r = ranges.get("peak_over_p999")
    if r is not None and r >= t["peak_over_p999"]:
        evidence.append((r / t["peak_over_p999"], f"a few extreme values (peak {r:.1f}x the 99.9th percentile of |x|)"))
    r = ranges.get("peak_over_rms")
    if layer.get("act_granularity") == "tensor" and r is not None and r >= t["peak_over_rms"]:
        evidence.append((r / t["peak_over_rms"], f"wide input distribution (peak {r:.0f}x the RMS: one per-tensor "
                                                 "scale spans it)"))
    r = layer.get("outliers", {}).get("channel_max_over_median")
    if r is not None and r >= t["outlier_channels"]:
        evidence.append((r / t["outlier_channels"], f"outlier channels {r:.0f}x"))
    concat = layer.get("concat")
    if concat and concat.get("ratio") is not None and concat["ratio"] >= t["concat_ratio"]:
        note = "" if concat["split_by_recipe"] else " (not split by the recipe)"
        evidence.append((concat["ratio"] / t["concat_ratio"],
                         f"skip-concat parts differ {concat['ratio']:.0f}x in range{note}"))
    r = layer.get("token_peak_over_rms")
    if layer.get("act_granularity") not in (None, "tensor") and r is not None and r >= t["token_peak_over_rms"]:
        evidence.append((r / t["token_peak_over_rms"], f"dynamic scales dominated by a few channels (token peak "
                                                       f"{r:.0f}x its RMS)"))
    if abs(w - a) <= t["weights_margin_db"]:
        causes.append(f"weights and activations alike ({w:.1f} / {a:.1f} dB)")
    causes += [text for _, text in sorted(evidence, key=lambda e: -e[0])]
    if not evidence:
        r = ranges.get("peak_over_rms")
        causes.append("activations: no single statistic stands out" + ("" if r is None else
                      f" (input peak {r:.0f}x its RMS)"))
    return causes


def worst_layers(layers: dict, count: int = WORST) -> list[str]:
    """The ``count`` layers with the lowest SQNR with weights and activations quantized (exact ones last)."""
    return sorted(layers, key=lambda n: (_db(layers[n]["sqnr_db"]["both"]), n))[:count]


def _row(name: str, layer: dict, rank: int) -> str:
    s, ranges = layer["sqnr_db"], layer.get("ranges", {})
    cal = layer.get("calibrated") or {}

    def num(v, suffix="x"):
        return "-" if v is None else f"{v:.1f}{suffix}"

    clipped = cal.get("clipped_fraction")
    return (f"| {rank} | `{name}` | {layer['kind']} W{layer['weight_bits']}A{layer['act_bits'] or 16} | "
            f"{_fmt_db(s['weights'])} | {_fmt_db(s['activations'])} | {_fmt_db(s['both'])} | "
            f"{num(ranges.get('step_variation'))} | {num(ranges.get('cfg_ratio'))} | "
            f"{num(layer.get('outliers', {}).get('channel_max_over_median'))} | "
            f"{'-' if clipped is None else f'{100 * clipped:.2g}%'} | {'; '.join(layer['causes'])} |")


def report_markdown(data: dict) -> str:
    """``report.md``: settings, the whole model's SQNR per step, the worst layers with their causes."""
    st, model = data["settings"], data["model"]
    branches = data["branches"]
    lines = [f"# dmquant inspect: {data['recipe']} ({data['tag']}) on {data['base_model']}", "",
             f"- calibration: {st['calibration_prompts']} prompts; measured on {st['eval_prompts']} held-out prompts "
             f"({'other prompts' if st['held_out_prompts'] else 'the same prompts'}, seeds from {st['eval_seed']}), "
             f"{st['num_inference_steps']} steps, guidance scale {st['guidance_scale']}",
             f"- steps measured: {', '.join(str(s) for s in data['steps'])} (timesteps "
             f"{', '.join(f'{t:g}' for t in data['timesteps'])}); {st['denoiser_calls']} denoiser calls; CFG: "
             f"{st['cfg']} ({', '.join(branches)})",
             f"- {len(data['layers'])} quantized layers, {len(data['attention'])} attention modules with fake-quantized "
             f"Q, K, V; {data['seconds']} s", "",
             "## Whole denoiser (all layers quantized) against full precision", "",
             f"Output SQNR {_fmt_db(model['sqnr_db'])} dB over all measured calls"
             + (f"; guided noise prediction (uncond + g·(cond − uncond)) {_fmt_db(model['guided_sqnr_db'])} dB"
                if "guided_sqnr_db" in model else "") + ".", ""]
    extra = [b for b in branches if len(branches) > 1] + (["guided"] if "guided_sqnr_db" in model else [])
    lines += ["| step | timestep | SQNR (dB) |" + "".join(f" {b} |" for b in extra),
              "| --- | --- | --- |" + " --- |" * len(extra)]
    for e in model["per_step"]:
        lines.append(f"| {e['step']} | {e['timestep']:g} | {_fmt_db(e['sqnr_db'])} |"
                     + "".join(f" {_fmt_db(e.get(b))} |" for b in extra))
    lines += ["", f"## The {len(data['worst'])} worst layers", "",
              "Each layer alone (all others in full precision, on the FP model's own input to it): output SQNR in dB "
              "with only its weights quantized (W), only its input activations (A), both. Range over steps: "
              "largest / smallest per-step input range (max − min); CFG: the two halves' ranges at the worst step; "
              "outliers: largest channel peak |x| / median channel peak; clipped: held-out inputs the "
              "calibrated static grid clips (beyond half a step past its ends).", "",
              "| # | layer | type | W | A | both | range over steps | CFG halves | outlier channels | clipped | likely cause |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [_row(n, data["layers"][n], i + 1) for i, n in enumerate(data["worst"])]
    concat = {n: v["concat"] for n, v in data["layers"].items() if v.get("concat")}
    if concat:
        lines += ["", "## Skip concatenations", "", "| layer | channels (h + skip) | peak of h | peak of skip | ratio | "
                  "split by the recipe | SQNR both |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for n, c in concat.items():
            p = c["parts"]
            lines.append(f"| `{n}` | {p[0]['channels']} + {p[1]['channels']} | {p[0]['absmax']} | {p[1]['absmax']} | "
                         f"{c['ratio']} | {'yes' if c['split_by_recipe'] else 'no'} | "
                         f"{_fmt_db(data['layers'][n]['sqnr_db']['both'])} |")
    if data["attention"]:
        att = sorted(data["attention"].items(), key=lambda kv: _db(kv[1]["sqnr_db"]))[:5]
        lines += ["", "## Attention: core attention output with only Q, K, V quantized (worst 5)", "",
                  "| module | SQNR (dB) | Q range over steps | K | V |", "| --- | --- | --- | --- | --- |"]
        for n, a in att:
            o = a["operands"]
            lines.append(f"| `{n}` | {_fmt_db(a['sqnr_db'])} | " + " | ".join(
                "-" if o[k]["step_variation"] is None else f"{o[k]['step_variation']:.1f}x" for k in "qkv") + " |")
    lines += ["", "## Plots", "", "![per-layer SQNR: weights only, activations only, both](sqnr_layers.png)", "",
              "![whole-model SQNR per step, and the input ranges per step of the worst layers](step_ranges.png)", "",
              "Causes are read off the statistics with fixed thresholds (`dmquant.diagnostics.report.THRESHOLDS`: "
              + ", ".join(f"{k} {v:g}" for k, v in THRESHOLDS.items())
              + "); they say where to look. All numbers are in `inspect.json`.", ""]
    return "\n".join(lines)


# -- plots ----------------------------------------------------------------------------------------------------
def draw_sqnr_bars(data: dict, count: int = 30, width: int = 1000):
    """Per-layer SQNR bars (weights only, activations only, both) of the ``count`` worst layers."""
    names = worst_layers(data["layers"], count)
    row, top = 20, 44
    height = top + row * len(names) + 30
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    finite = [v for n in names for v in data["layers"][n]["sqnr_db"].values() if v is not None]
    hi = max(20.0, math.ceil((max(finite) if finite else 40.0) / 10) * 10 + 10)
    lo = min(0.0, math.floor(min(finite) / 10) * 10) if finite else 0.0
    x0, x1 = 380, width - 20

    def at(v: float) -> float:
        return x0 + (x1 - x0) * (min(max(v, lo), hi) - lo) / (hi - lo)

    draw.text((10, 6), f"per-layer output SQNR (dB), the {len(names)} worst layers: weights only (blue), activations "
                       "only (orange), both (red); exact: full bar, light", fill="black")
    for v in range(int(lo), int(hi) + 1, 10):
        x = at(v)
        draw.line([(x, top - 6), (x, height - 28)], fill=(225, 225, 225))
        draw.text((x - 6, height - 24), f"{v}", fill="black")
    for i, name in enumerate(names):
        y = top + i * row
        label = short_name(name, 58)
        draw.text((6, y + 3), label, fill="black")
        for j, variant in enumerate(("weights", "activations", "both")):
            value = data["layers"][name]["sqnr_db"][variant]
            color = COLORS[variant] if value is not None else tuple(200 + c // 5 for c in COLORS[variant])
            yy = y + 2 + j * 5
            draw.rectangle([x0, yy, at(hi if value is None else value), yy + 4], fill=color)
    return img


def short_name(name: str, limit: int = 40) -> str:
    """A layer name shortened for a plot (``attentions.`` -> ``attn.``, ``transformer_blocks.`` -> ``tb.``)."""
    for long, short in (("transformer_blocks.", "tb."), ("attentions.", "attn."), ("resnets.", "res.")):
        name = name.replace(long, short)
    return name if len(name) <= limit else "..." + name[-(limit - 3):]


def _panel(draw, box, title: str, xs: list, series: list[tuple[str, tuple, list]], hlines=()):
    """A small line chart in ``box`` (x0, y0, x1, y1): ``series`` of (label, color, ys; None gaps)."""
    bx0, by0, bx1, by1 = box
    draw.text((bx0 + 4, by0 + 2), title, fill="black")
    px0, py0, px1, py1 = bx0 + 48, by0 + 20, bx1 - 10, by1 - 34
    values = [y for _, _, ys in series for y in ys if y is not None] + [h for _, _, h in hlines]
    if not values or not xs:
        draw.text((px0, py0 + 20), "no data", fill="black")
        return
    lo, hi = min(values + [0.0]), max(values)
    hi = hi if hi > lo else lo + 1.0
    lo, hi = lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo)
    draw.rectangle([px0, py0, px1, py1], outline=(160, 160, 160))
    span = max(len(xs) - 1, 1)

    def at(i: int, y: float):
        return px0 + (px1 - px0) * i / span, py1 - (py1 - py0) * (y - lo) / (hi - lo)

    for y in (lo, (lo + hi) / 2, hi):
        draw.text((bx0 + 2, at(0, y)[1] - 6), f"{y:.3g}", fill="black")
    for i, x in enumerate(xs):
        draw.text((at(i, lo)[0] - 4, py1 + 4), str(x), fill="black")
    for _, color, y in hlines:
        draw.line([at(0, y), at(span, y)], fill=color, width=1)
    legend = bx0 + 4
    for label, color, ys in series:
        points = [at(i, y) for i, y in enumerate(ys) if y is not None]
        if len(points) > 1:
            draw.line(points, fill=color, width=2)
        for px, py in points:
            draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=color)
        draw.text((legend, by1 - 16), label, fill=color)
        legend += 8 * len(label) + 12


def draw_step_ranges(data: dict, layers: int = 5, panel: tuple[int, int] = (330, 230)):
    """The whole denoiser's SQNR per step (first panel) and the per-step input peak |x| of the ``layers`` worst
    layers, one line per CFG branch, with the calibrated static range (grey) where there is one."""
    pw, ph = panel
    names = worst_layers(data["layers"], layers)
    cols = 3
    rows = math.ceil((len(names) + 1) / cols)
    img = Image.new("RGB", (pw * cols, ph * rows), "white")
    draw = ImageDraw.Draw(img)
    steps, branches = data["steps"], data["branches"]
    model = data["model"]["per_step"]
    series = [("all", (0, 0, 0), [e["sqnr_db"] for e in model])]
    if len(branches) > 1:
        series += [(b, BRANCH_COLORS[i % 4], [e.get(b) for e in model]) for i, b in enumerate(branches)]
    if "guided_sqnr_db" in data["model"]:
        series.append(("guided", (150, 60, 180), [e.get("guided") for e in model]))
    _panel(draw, (0, 0, pw, ph), "whole denoiser: output SQNR (dB) per step", steps, series)
    for k, name in enumerate(names, start=1):
        layer = data["layers"][name]
        per = {e["step"]: e for e in layer["ranges"]["per_step"]}
        series = [(b, BRANCH_COLORS[i % 4], [per.get(s, {}).get(b, {}).get("absmax") for s in steps])
                  for i, b in enumerate(branches)]
        hlines = []
        cal = layer.get("calibrated")
        if cal:
            ends = [max(abs(lo), abs(hi)) for per_step in cal["ranges_per_step"] for lo, hi in per_step[:1]
                    if lo is not None and hi is not None]
            if ends:
                hlines.append(("calibrated", (150, 150, 150), max(ends)))
        short = short_name(name)
        box = ((k % cols) * pw, (k // cols) * ph, (k % cols + 1) * pw, (k // cols + 1) * ph)
        _panel(draw, box, f"{short}: input peak |x|", steps, series, hlines)
    return img


def format_summary(data: dict, count: int = 5) -> str:
    """A few lines for the terminal: the whole model's SQNR and the ``count`` worst layers with their causes."""
    lines = [f"whole denoiser: {_fmt_db(data['model']['sqnr_db'])} dB output SQNR"
             + (f", guided {_fmt_db(data['model']['guided_sqnr_db'])} dB" if "guided_sqnr_db" in data["model"] else "")]
    for name in data["worst"][:count]:
        layer = data["layers"][name]
        s = layer["sqnr_db"]
        lines.append(f"  {_fmt_db(s['both']):>6} dB (W {_fmt_db(s['weights'])}, A {_fmt_db(s['activations'])})  {name}: "
                     f"{'; '.join(layer['causes'])}")
    return "\n".join(lines)

"""`attributions.html`: the words of each explained text shaded by their attribution.

One self-contained page (no script, no external resource). A pair shows its prompt, the margin
F(chosen) − F(rejected), and chosen and rejected side by side; each side lists its score, the
baseline score and the convergence delta, the prompt's words (as the model saw them, chat template
included) and the response's words. A word's background is blue when it raises the score and orange
when it lowers it (Okabe–Ito colours, distinguishable with every common colour-vision deficiency), its
opacity |A| / max|A| over the pair, and its exact attribution is its hover title. Every piece of text
goes through Jinja2's autoescape: a token like `<script>` is shown as text, never run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from jinja2 import Environment


class Explanation(Protocol):
    """What the page reads of a `raylign.evaluation.explain.Explanation` (that module imports this one)."""

    score: float
    baseline_score: float
    delta: float
    steps: int
    prompt: Any
    meta: dict[str, Any]

    def words(self) -> list[dict[str, Any]]: ...

# Positive attributions (raise the score) and negative ones: Okabe–Ito blue and orange, distinguishable
# with every common colour-vision deficiency.
POSITIVE_RGB = (0, 114, 178)
NEGATIVE_RGB = (230, 159, 0)
MAX_ALPHA = 0.85  # the strongest shade still leaves black text readable

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'">
<title>Attributions: {{ summary.model }}</title>
<style>
 body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #111; max-width: 1200px; }
 .legend span { padding: 0 .4rem; margin-right: .6rem; }
 .card { border: 1px solid #ccc; border-radius: 6px; padding: .8rem 1rem; margin: 1rem 0; }
 .sides { display: grid; grid-template-columns: repeat({{ columns }}, minmax(0, 1fr)); gap: 1rem; }
 .side h3 { margin: .2rem 0; font-size: 1rem; }
 .stats { font-size: .8rem; color: #444; margin-bottom: .4rem; }
 .text { white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: .9rem; line-height: 1.7; }
 .context { opacity: .8; font-size: .8rem; border-bottom: 1px dashed #bbb; padding-bottom: .3rem; margin-bottom: .3rem; }
 .w { border-radius: 3px; }
 .sp { color: #888; }
 .prompt { white-space: pre-wrap; background: #f4f4f4; padding: .4rem; border-radius: 4px; }
</style>
</head>
<body>
<h1>Why did the model give these scores?</h1>
<p><b>{{ summary.target }}</b> ({{ summary.kind }}): Integrated Gradients on the embedding layer, baseline = pad
tokens with special tokens kept. Hover a word for its exact attribution (score units; a word's attributions
sum its tokens'). Σ attributions = score − baseline score up to δ.</p>
<p class="legend"><span style="background-color: {{ positive }}">raises the score</span>
<span style="background-color: {{ negative }}">lowers the score</span></p>
<p>Completeness: max |δ| {{ '%.3g' | format(summary.completeness.max_abs_delta) }}.
{% if summary.deletion %}Deletion test: AOPC top-k {{ '%.4f' | format(summary.deletion.aopc_top) }} vs random
{{ '%.4f' | format(summary.deletion.aopc_random) }} (difference 95% CI [{{ '%+.4f' | format(summary.deletion.ci_low) }},
{{ '%+.4f' | format(summary.deletion.ci_high) }}]).{% endif %}</p>
{% for card in cards %}
<section class="card" id="item-{{ card.index }}">
 <h2>#{{ card.index }}{% if card.margin is not none %} · margin {{ '%+.4f' | format(card.margin) }}{% endif %}</h2>
 {% if card.prompt is not none %}<div class="prompt">{{ card.prompt }}</div>{% endif %}
 <div class="sides">
 {% for side in card.sides %}
  <div class="side {{ side.label }}">
   <h3>{{ side.label }}</h3>
   <div class="stats">score {{ '%.4f' | format(side.score) }} · baseline {{ '%.4f' | format(side.baseline) }}
    · δ {{ '%+.2e' | format(side.delta) }} · {{ side.steps }} IG steps</div>
   {% if side.context %}<div class="text context">{% for w in side.context %}<span class="w{% if w.special %} sp{% endif %}" style="background-color: {{ w.colour }}" title="{{ w.title }}">{{ w.text }}</span>{% endfor %}</div>{% endif %}
   <div class="text response">{% for w in side.response %}<span class="w{% if w.special %} sp{% endif %}" style="background-color: {{ w.colour }}" title="{{ w.title }}">{{ w.text }}</span>{% endfor %}</div>
  </div>
 {% endfor %}
 </div>
</section>
{% endfor %}
</body>
</html>
"""


def shade(value: float, scale: float) -> str:
    """CSS colour of an attribution: blue (raises) or orange (lowers), opacity |value| / scale."""
    r, g, b = POSITIVE_RGB if value >= 0 else NEGATIVE_RGB
    alpha = 0.0 if scale <= 0 else min(1.0, abs(value) / scale) * MAX_ALPHA
    return f"rgba({r}, {g}, {b}, {alpha:.3f})"


def _prompt_text(prompt: Any) -> str | None:
    if prompt is None:
        return None
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" for m in prompt)


def _side(ex: Explanation, scale: float) -> dict[str, Any]:
    words = []
    for w in ex.words():
        shown = w["text"].strip() or repr(w["text"])
        words.append({**w, "colour": shade(w["attribution"], scale),
                      "title": f"{shown}: {w['attribution']:+.6g} ({w['tokens']} token{'s' if w['tokens'] > 1 else ''})"})
    return {"label": ex.meta.get("side", "text"), "score": ex.score, "baseline": ex.baseline_score,
            "delta": ex.delta, "steps": ex.steps, "context": [w for w in words if not w["response"]],
            "response": [w for w in words if w["response"]]}


def cards(explanations: Sequence[Explanation]) -> list[dict[str, Any]]:
    """One card per pair (consecutive chosen/rejected explanations of one index) or per text."""
    groups: list[list[Explanation]] = []
    for ex in explanations:
        if groups and ex.meta.get("side") == "rejected" and groups[-1][0].meta.get("index") == ex.meta.get("index"):
            groups[-1].append(ex)
        else:
            groups.append([ex])
    out: list[dict[str, Any]] = []
    for group in groups:
        scale = max((abs(w["attribution"]) for ex in group for w in ex.words()), default=0.0)
        margin = group[0].score - group[1].score if len(group) == 2 else None
        out.append({"index": group[0].meta.get("index", len(out)), "margin": margin,
                    "prompt": _prompt_text(group[0].prompt), "sides": [_side(ex, scale) for ex in group]})
    return out


def render_attributions(explanations: Sequence[Explanation], summary: dict[str, Any]) -> str:
    """The page's HTML (module docstring)."""
    env = Environment(autoescape=True, trim_blocks=False, lstrip_blocks=False)
    built = cards(explanations)
    columns = max((len(c["sides"]) for c in built), default=1)
    return env.from_string(PAGE).render(summary=summary, cards=built, columns=columns,
                                        positive=shade(1.0, 1.0), negative=shade(-1.0, 1.0))

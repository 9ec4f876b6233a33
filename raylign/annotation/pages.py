"""The annotator's pages: server-rendered HTML that works without JavaScript.

Templates are Jinja2 with autoescape on for every template, so model text (prompts, answers, reasons,
names) is always rendered as text: a completion containing `<script>` shows those characters. Pages
load one stylesheet and one small script from `raylign/annotation/static/` (keyboard shortcuts 1 / 2 /
3 / 0 and a progress refresh); the Content-Security-Policy the app sends allows no other script.
"""

from __future__ import annotations

from typing import Any

from jinja2 import DictLoader, Environment, StrictUndefined

_BASE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>{{ title }} · raylign annotate</title>
<link rel="stylesheet" href="/static/annotate.css">
<script src="/static/annotate.js" defer></script>
</head>
<body>
<header class="bar">
  <span class="brand">raylign annotate</span>
  {% if annotator %}<span class="who">{{ annotator }}</span>
  <span class="progress" id="progress" data-done="{{ progress.done }}" data-total="{{ progress.total }}">
    <progress id="progress-bar" value="{{ progress.done }}" max="{{ [progress.total, 1] | max }}"></progress>
    <span id="progress-text">{{ progress.done }} / {{ progress.total }} done</span>
  </span>{% endif %}
</header>
<main>
{% block main %}{% endblock %}
</main>
</body>
</html>
"""

_ITEM = """{% extends "base.html" %}
{% block main %}
{% if instructions %}<section class="instructions">{{ instructions }}</section>{% endif %}
{% if error %}<p class="error" role="alert" id="error">{{ error }}</p>{% endif %}
{% if current %}<p class="note" id="current">You already answered this item: {{ current }}. Answering again replaces that answer.</p>{% endif %}
{% if turns %}
<section class="prompt" id="prompt" aria-label="prompt">
  {% for role, content in turns %}
  <div class="turn turn-{{ role }}"><div class="role">{{ role }}</div><div class="content">{{ content }}</div></div>
  {% endfor %}
</section>
{% endif %}
<form method="post" action="/judge" id="judge-form" data-item="{{ item_id }}">
  <input type="hidden" name="csrf_token" value="{{ csrf }}">
  <input type="hidden" name="item_id" value="{{ item_id }}">
  <input type="hidden" name="idempotency_key" value="{{ nonce }}">
  {% if pair %}
  <div class="answers">
    <article class="answer" id="answer-left"><h2>Answer A</h2><div class="content">{{ left }}</div></article>
    <article class="answer" id="answer-right"><h2>Answer B</h2><div class="content">{{ right }}</div></article>
  </div>
  {% if ask_written_by %}
  <fieldset class="written-by" id="written-by">
    <legend>One answer was written by a person. Which one? (optional)</legend>
    <label><input type="radio" name="written_by" value="left" id="written-left"{% if written_by == "left" %} checked{% endif %}> A</label>
    <label><input type="radio" name="written_by" value="right" id="written-right"{% if written_by == "right" %} checked{% endif %}> B</label>
  </fieldset>
  {% endif %}
  <fieldset class="choices">
    <legend>Which answer is better?</legend>
    <button type="submit" name="choice" value="left" data-key="1" id="choose-left">A is better <kbd>1</kbd></button>
    <button type="submit" name="choice" value="right" data-key="2" id="choose-right">B is better <kbd>2</kbd></button>
    <button type="submit" name="choice" value="tie" data-key="3" id="choose-tie">About the same <kbd>3</kbd></button>
    <button type="submit" name="choice" value="skip" data-key="0" id="choose-skip">Cannot judge <kbd>0</kbd></button>
  </fieldset>
  <fieldset class="strength">
    <legend>How much better? (optional)</legend>
    {% for value, label in strengths %}
    <label><input type="radio" name="strength" value="{{ value }}"{% if value == strength %} checked{% endif %}> {{ label }}</label>
    {% endfor %}
  </fieldset>
  {% else %}
  <article class="answer single" id="answer-left"><h2>Answer</h2><div class="content">{{ left }}</div></article>
  <fieldset class="ratings">
    <legend>Rate the answer from {{ low }} (worst) to {{ high }} (best)</legend>
    <table>
      <tr><th></th>{% for v in scale %}<th>{{ v }}</th>{% endfor %}</tr>
      {% for criterion in criteria %}{% set i = loop.index0 %}
      <tr class="criterion"><th scope="row">{{ criterion }}</th>
        {% for v in scale %}<td><input type="radio" name="rating-{{ i }}" value="{{ v }}" aria-label="{{ criterion }} {{ v }}"
          {% if ratings.get(criterion) == v %} checked{% endif %} required></td>{% endfor %}
      </tr>
      {% endfor %}
    </table>
  </fieldset>
  <fieldset class="choices">
    <button type="submit" name="choice" value="rate" id="submit-ratings">Submit ratings</button>
    <button type="submit" name="choice" value="skip" data-key="0" id="choose-skip" formnovalidate>Cannot judge <kbd>0</kbd></button>
  </fieldset>
  {% endif %}
  <label class="reason">Reason (optional)<br><textarea name="reason" maxlength="{{ reason_max }}" rows="2">{{ reason }}</textarea></label>
</form>
{% if previous %}<p class="previous"><a href="/item/{{ previous }}" id="previous">Change my previous answer</a></p>{% endif %}
{% endblock %}
"""

_DONE = """{% extends "base.html" %}
{% block main %}
<section class="done" id="done">
  <h1>All done, thank you!</h1>
  <p>You answered {{ progress.done }} item{{ "" if progress.done == 1 else "s" }}. New items may come later: this page shows them.</p>
  {% if previous %}<p class="previous"><a href="/item/{{ previous }}" id="previous">Change my previous answer</a></p>{% endif %}
</section>
{% endblock %}
"""

_MESSAGE = """{% extends "base.html" %}
{% block main %}
<section class="message" id="message"><h1>{{ title }}</h1><p>{{ message }}</p></section>
{% endblock %}
"""

_ENV = Environment(loader=DictLoader({"base.html": _BASE, "item.html": _ITEM, "done.html": _DONE,
                                      "message.html": _MESSAGE}),
                   autoescape=True, undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def render(template: str, **context: Any) -> str:
    """A page; every value is escaped unless a template says otherwise (none does)."""
    context.setdefault("annotator", None)
    return _ENV.get_template(template).render(**context)

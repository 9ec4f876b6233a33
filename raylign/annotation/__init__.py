"""Humans in the loop: the annotation app (`raylign annotate`).

  tasks     the TASK.jsonl format, reading it, `annotate make`
  store     the SQLite store: annotators (hashed tokens), the queue, append-only judgments
  app       the FastAPI app: server-rendered pages (no JavaScript needed) and the JSON API
  pages     the Jinja2 templates (autoescaped), static/ the stylesheet and the small script
  export    current judgments as pairs / ratings / unpaired / judgments files
  report    agreement statistics (raylign.evaluation.agreement) as JSON, markdown and PNG
  simulate  simulated annotators (a reward source plus noise) judging through the HTTP API
  cli       the `annotate` sub-commands

Nothing here is imported by this file: `raylign --help` stays fast, and only `app` needs FastAPI.
"""

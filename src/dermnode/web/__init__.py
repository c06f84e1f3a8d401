"""The web console: worklist, result pages, upload and status, served by ``dermnode serve`` (``[web]``).

It reads the same state database and results folder as the CLI (:mod:`dermnode.web.state`), takes uploads
through the Store SCP's spool and job queue (:mod:`dermnode.web.ingest`), and never analyses, builds outputs or
sends anything itself. See docs/web-console.md.
"""

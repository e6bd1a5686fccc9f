"""The scancache store: its format and versions, the job's writing session and the readers.

Everything here is storage-level: ``store`` never imports ``client`` (the HTTP side),
``service`` (the job's orchestration and the server) or ``loaders``; they import it.
"""

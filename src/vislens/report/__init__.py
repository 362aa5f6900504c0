"""The study report: each experiment's summary as a section of one page (vislens.render
draws it). The top layer beside the CLI: it reads experiments' summaries; only the CLI
imports it."""

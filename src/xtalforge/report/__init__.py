"""HTML report of a run directory, with figures, and a registry for extra sections."""

# Sections of other components register themselves on import; importing them here
# means every `write_report` caller (the CLI included) gets them.
from xtalforge.report import active_section  # noqa: F401  (registers "Active learning")
from xtalforge.report.figures import FIGURE_DIR, new_figure, save_figure
from xtalforge.report.html import (
    REPORT_NAME,
    register_section,
    registered_sections,
    table_html,
    unregister_section,
    write_report,
)

__all__ = [
    "FIGURE_DIR",
    "REPORT_NAME",
    "new_figure",
    "register_section",
    "registered_sections",
    "save_figure",
    "table_html",
    "unregister_section",
    "write_report",
]

"""docs/architecture.md draws the job status table from the code's table: the two stay equal, and the
package docstring points at the document."""
import os
import re

import pyrep
from pyrep.jobs.job import TRANSITIONS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOC = os.path.join(ROOT, "docs", "architecture.md")


def _rows_from_code():
    rows = []
    for event, table in TRANSITIONS.items():
        for old, new in table.items():
            to = " or ".join(sorted(s.value for s in new)) + " (the status before the pause)" \
                if isinstance(new, frozenset) else new.value
            rows.append(f"| {event} | {old.value} | {to} |")
    return rows


def test_the_job_status_table_in_the_doc_is_the_codes_table():
    with open(DOC) as f:
        text = f.read()
    block = re.search(r"<!-- job-status-table:.*?-->\n(.*?)<!-- end job-status-table -->", text, re.S).group(1)
    rows = [line for line in block.splitlines() if line.startswith("| ") and not line.startswith("| event")]
    assert rows == _rows_from_code()


def test_the_replication_stage_table_in_the_doc_is_the_codes_table():
    from pyrep.replication_state import IGNORED, TRANSITIONS as STAGES
    with open(DOC) as f:
        text = f.read()
    block = re.search(r"<!-- replication-stage-table:.*?-->\n(.*?)<!-- end replication-stage-table -->", text,
                      re.S).group(1)
    rows = [line for line in block.splitlines() if line.startswith("| ") and not line.startswith("| event")]
    assert rows == [f"| {ev.value} | {st.value} | {'ignored' if new is IGNORED else new.value} |"
                    for (st, ev), new in STAGES.items()]


def test_the_package_points_at_docs_that_exist():
    doc = pyrep.__doc__
    for ref in re.findall(r"``(docs/[\w./-]+)``", doc):
        assert os.path.exists(os.path.join(ROOT, ref)), ref
    assert "docs/architecture.md" in doc and "ARCHITECTURE.md" not in doc.replace("docs/architecture.md", "")

"""A worker's log (what `rtrec up` writes to .rtrec/run/*.log) is plain text: no Faust banner, no spinner escapes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys


def test_worker_log_has_no_banner_and_no_escape_codes(tmp_path):
    with socket.socket() as s:  # a port nothing listens on: the worker logs its error and exits
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "RTREC_KAFKA_BOOTSTRAP": f"127.0.0.1:{port}",
        "RTREC_REDIS_URL": f"redis://127.0.0.1:{port}",
        "RTREC_RUN_DIR": str(tmp_path / "run"),
    }
    env.pop("RTREC_LOG_LEVEL", None)
    log = tmp_path / "state.log"
    with open(log, "wb") as out:
        try:
            subprocess.run(
                [sys.executable, "-m", "rtrec.workers.state"],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=tmp_path,
                timeout=30,
            )
        except subprocess.TimeoutExpired:
            pass
    text = log.read_text(errors="replace")
    assert text.strip(), "the worker wrote nothing"
    assert "\x1b[" not in text and "OK ^" not in text, text[:2000]
    assert "| transport " not in text and "| id " not in text, text[:2000]  # Faust's banner table

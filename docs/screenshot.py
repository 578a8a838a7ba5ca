"""Take the screenshot of the ``/daskdist`` page (docs/dashboard.md) during the main job.

Runs the default pipeline (``pipelines/digits-mlp.yaml``) on an embedded
two-worker cluster and, once half its epochs are done, has headless Chromium
save the page to ``docs/dashboard.png``.

Run: ``python docs/screenshot.py`` (needs Debian's ``chromium``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main():
    from distributed import Client

    from daskdist import dashboard, embedded_cluster
    from daskdist.batch import load_pipeline, run_pipeline

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("needs chromium (apt-get install chromium)")
    pipeline = load_pipeline(ROOT / "pipelines/digits-mlp.yaml",
                             overrides={"train.max_epochs": 60})
    with embedded_cluster(n_workers=2) as cluster, Client(cluster) as client, \
            tempfile.TemporaryDirectory() as out:
        link = dashboard.install(client)
        with client.as_current():
            run = threading.Thread(target=run_pipeline, args=(pipeline,),
                                   kwargs={"output": out, "overwrite": True, "progress": False})
            run.start()
            while True:
                runs = json.load(urllib.request.urlopen(link + "/runs.json"))["runs"]
                if runs and runs[0]["epochs"] >= 30:
                    break
                time.sleep(0.2)
            shot = ROOT / "docs/dashboard.png"
            subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                            "--hide-scrollbars", "--virtual-time-budget=3000",
                            "--window-size=1500,1000", f"--screenshot={shot}", link],
                           check=True, capture_output=True)
            run.join()
    print(f"saved {shot}")


if __name__ == "__main__":
    main()

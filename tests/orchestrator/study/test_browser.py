"""A study seen in a real browser: Debian's headless Chromium, driven by Playwright, opens the MLflow UI
served by `mlflow server` on 127.0.0.1 and the study's HTML report (`make browser` installs both)."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.search.status import child_label
from orchestrator.study.robustness import RobustnessStudy
from tests.conftest import digits_config
from tests.orchestrator.search.test_cluster import mlflow_server

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-background-networking", "--disable-gpu", "--disable-component-update",
         "--disable-sync", "--no-first-run"]


def _browser_or_skip() -> None:
    missing = []
    if shutil.which(CHROMIUM) is None:
        missing.append("chromium")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("playwright")
    if missing:
        why = f"{' and '.join(missing)} not installed: run `make browser`"
        if os.environ.get("CI"):
            pytest.fail(why)  # CI installs them: missing there is a failure, not a skip
        pytest.skip(why)


@pytest.mark.slow
@pytest.mark.timeout(420)
@pytest.mark.usefixtures("ray_runtime")
def test_mlflow_ui_and_html_report_show_the_study(workdir: Path) -> None:
    _browser_or_skip()
    from playwright.sync_api import expect, sync_playwright

    with mlflow_server(workdir) as url:
        cfg = digits_config(method={"name": "kd"}, training={"epochs": 1, "lr": 0.05},
                            teacher={"architecture": "cnn", "args": {"width": 8}, "training": {"epochs": 2}},
                            student={"architecture": "mlp", "args": {}}, scaling={"cpus_per_worker": 0.5},
                            tracking={"uri": url, "experiment": "browser"})
        study = RobustnessStudy("browser-study", cfg, {"kd": None, "dkd": None}, n_settings=2, seeds=[0],
                                concurrency=4).run()
        report = study.report(workdir / "report")
        results = study.results()
        finished = results[results["status"] == "finished"].iloc[0]
        child = finished["run_id"]
        run = MlflowClient(url).get_run(child)
        child_name = child_label(run.data.tags, compact=True)  # e.g. "kd s0 temp=4.1 kw=0.5"
        assert child_name.startswith(("kd s0", "dkd s0", "ce s0")) and run.info.run_name == child_name

        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(f"{url}/#/experiments/{study.experiment_id}/runs")
            expect(page.get_by_text("browser-study", exact=True)).to_be_visible(timeout=60_000)
            page.locator("button[data-component-id*='runnamecellrenderer']").first.click()  # expand its children
            expect(page.get_by_text(child_name, exact=True)).to_be_visible(timeout=30_000)
            assert page.locator(f"a[href*='{child}']").count() >= 1
            # The Dataset column: each child's splits as MLflow inputs, "digits (<digest>)" with its context.
            expect(page.get_by_text(re.compile(r"^digits \([0-9a-f]{8}\)$")).first).to_be_visible(timeout=30_000)
            page.screenshot(path=str(workdir / "mlflow_runs.png"))

            # The link kdo prints opens the study's own view: its runs, with their accuracy, configured by nobody.
            view = study.ui_hint().split("then open ")[-1].removeprefix("open ")
            assert view.startswith(f"{url}/#/experiments/{study.experiment_id}/runs?viewStateShareKey=browser-study")
            page.goto(view)
            expect(page.get_by_text(child_name, exact=True)).to_be_visible(timeout=60_000)
            expect(page.get_by_text("selected_val_acc", exact=True).first).to_be_visible(timeout=30_000)
            shown = f"{finished['val_acc']:.6f}"[:5]  # the UI shows the fraction's leading digits
            expect(page.get_by_text(re.compile(rf"^{re.escape(shown)}")).first).to_be_visible(timeout=30_000)
            page.screenshot(path=str(workdir / "mlflow_view.png"))

            # A child's page says what it is and how it ended, above its metrics.
            page.goto(f"{url}/#/experiments/{study.experiment_id}/runs/{child}")
            described = re.compile(rf"^{re.escape(child_label(run.data.tags))}: finished: val \d+\.\d\d, test")
            expect(page.get_by_text(described).first).to_be_visible(timeout=60_000)
            page.screenshot(path=str(workdir / "mlflow_child.png"))

            page.goto(f"{url}/#/experiments/{study.experiment_id}/runs/{study.parent_run_id}"
                      "/artifacts/plots/distribution.png")
            plot = page.locator("img[alt='plots/distribution.png']").first
            expect(plot).to_be_visible(timeout=60_000)
            assert plot.evaluate("img => img.complete && img.naturalWidth > 100")

            page.goto(report.resolve().as_uri())
            expect(page.get_by_role("heading", name="Robustness study: browser-study")).to_be_visible()
            widths = page.locator("figure img").evaluate_all("imgs => imgs.map(i => i.naturalWidth)")
            assert len(widths) >= 5 and min(widths) > 100, widths
            expect(page.get_by_text("Verdict rule", exact=False)).to_be_visible()
            verdict = page.locator("ul.verdicts li").first  # the answer comes first: above every table
            expect(verdict).to_contain_text("kd more robust than dkd: ")
            assert verdict.bounding_box()["y"] < page.locator("table").first.bounding_box()["y"]
            link = page.locator(f"a[href='{url}/#/experiments/{study.experiment_id}/runs/{study.parent_run_id}']")
            assert link.count() == 1
            assert all(len(c) > 40 for c in page.locator("figcaption").all_inner_texts())  # how to read each plot
            page.screenshot(path=str(workdir / "report.png"))
            browser.close()

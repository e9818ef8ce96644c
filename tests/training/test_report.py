"""The study report: numbers from the run files, banners, missing parts, headless-Chromium rendering."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image
from report_fake_run import make_fake_run
from scipy import stats

from training.explain import run_shap
from training.report import build_report
from training.report.tables import fmt_ci

CHROMIUM = Path("/usr/bin/chromium")
needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="headless Chromium not installed (apt-get install chromium)"
)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = make_fake_run(tmp_path_factory.mktemp("report"))
    run_shap(run)
    return run


@pytest.fixture(scope="module")
def html(run: Path) -> str:
    path = build_report(run)
    assert path == run / "report.html"
    return path.read_text()


def _text(html: str) -> str:
    """Visible text with tags removed (cells are compared as the reader sees them)."""
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html)).replace("&lt;", "<").replace("&amp;", "&")


def test_performance_numbers_are_the_ones_in_metrics_json(run: Path, html: str) -> None:
    metrics = json.loads((run / "metrics.json").read_text())
    text = _text(html)
    md = (run / "report.md").read_text()
    checked = 0
    for cohort in ("training", "external_validation"):
        for model in ("dfsig", "fusion"):
            entry = metrics["cohorts"][cohort]["models"][model]
            auc = f"{entry['auc']:.3f} ({entry['auc_ci'][0]:.3f}–{entry['auc_ci'][1]:.3f})"
            sen = entry["threshold"]["metrics"]["sensitivity"]
            assert auc in text and auc in md
            assert fmt_ci(sen["value"], sen["ci"]) in text
            hl = entry["calibration"]["hosmer_lemeshow"]
            assert f"{hl['statistic']:.2f} ({hl['df']})" in text
            checked += 1
    pair = metrics["cohorts"]["internal_validation"]["pairwise_delong"][0]
    assert f"{pair['diff']:.3f} ({pair['ci_low']:.3f}–{pair['ci_high']:.3f})" in text
    assert f"{metrics['cutoffs']['dfsig']:.3f}" in text
    assert checked == 4


def test_cohort_table_p_values_match_an_independent_test(run: Path, html: str) -> None:
    preds = pd.read_csv(run / "predictions.csv")
    train = preds[preds["cohort"] == "training"]
    ext = preds[preds["cohort"] == "external_validation"]
    p = stats.mannwhitneyu(train["age"], ext["age"], alternative="two-sided").pvalue
    table = pd.read_csv(run / "tables" / "cohort_characteristics.csv", keep_default_na=False)
    row = table[table["Characteristic"] == "age, median [IQR]"].iloc[0]
    expected = "<0.001" if p < 0.001 else f"{p:.3f}"
    assert row["p (training vs external_validation)"] == expected
    assert row["training"] == f"{train['age'].median():.3g} [{train['age'].quantile(0.25):.3g}–" + (
        f"{train['age'].quantile(0.75):.3g}]"
    )
    n_missing = int(preds.loc[preds["cohort"] == "training", "cea"].isna().sum())
    assert n_missing > 0 and f"{n_missing} ({100 * n_missing / len(train):.1f}%)" in _text(html)


def test_report_has_paper_sections_banners_and_embedded_figures(run: Path, html: str) -> None:
    for title in ("Cohort characteristics", "Clinical model", "DFSigM", "Fusion model", "Performance",
                  "Calibration and clinical utility", "Explainability", "TRIPOD+AI"):  # fmt: skip
        assert title in html
    assert "SYNTHETIC COHORT" in html and "NOT clinical evidence" in html
    assert "RANDOM WEIGHTS" in html
    assert "Grad-CAM: not computed (cam/cam.json missing)" in html
    assert json.loads((run / "shap" / "shap.json").read_text())["explainer"] in html
    n_images = html.count('src="data:image/png;base64,')
    assert n_images >= 10  # ROC, calibration, DCA, LASSO, comparison, nomogram, 4 SHAP
    md = (run / "report.md").read_text()
    for link in re.findall(r"\]\(([^)]+\.png)\)", md):
        assert (run / link).is_file(), link


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.refs += [v or "" for k, v in attrs if k in {"src", "href"}]


def test_report_makes_no_external_requests(html: str) -> None:
    parser = _Refs()
    parser.feed(html)
    assert parser.refs and all(r.startswith(("data:image/png;base64,", "#")) for r in parser.refs)
    assert "default-src 'none'" in html  # CSP: the browser would block anything else
    style = html.split("<style>", 1)[1].split("</style>", 1)[0]
    assert '"DejaVu Sans"' in style and "&#" not in style  # CSS inlined verbatim (not HTML-escaped)


def test_real_clinical_cohort_has_no_synthetic_banner(tmp_path: Path) -> None:
    run = make_fake_run(tmp_path, synthetic=False, random_weights=False)
    html = build_report(run).read_text()
    assert "SYNTHETIC COHORT" not in html and "RANDOM WEIGHTS" not in html
    assert "SHAP: not computed" in html


def test_missing_metrics_still_gives_a_report(run: Path, tmp_path: Path) -> None:
    partial = tmp_path / "partial"
    shutil.copytree(run, partial)
    (partial / "metrics.json").unlink()
    html = build_report(partial).read_text()
    assert "metrics.json is missing" in html and "Predictive performance" not in html


# ------------------------------------------------------------------------------------------- Chromium


def _chromium(url: str, tmp: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [
        str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp / 'profile'}", "--enable-logging=stderr", "--v=0", *extra, url,
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def _console(stderr: str) -> list[str]:
    """Console messages (JS errors, CSP violations, failed loads) from Chromium's stderr log."""
    return [ln for ln in stderr.splitlines() if ":CONSOLE" in ln or "Uncaught" in ln]


@needs_chromium
def test_console_check_catches_errors(tmp_path: Path) -> None:
    """Negative control: the same check flags a page with a script error and an external image."""
    bad = tmp_path / "bad.html"
    bad.write_text(
        '<!DOCTYPE html><html><head><meta http-equiv="Content-Security-Policy" '
        'content="default-src \'none\'"></head><body><img src="http://example.invalid/x.png">'
        '<script>throw new Error("boom")</script></body></html>'
    )
    proc = _chromium(bad.as_uri(), tmp_path, "--dump-dom")
    assert proc.returncode == 0
    assert _console(proc.stderr)


@needs_chromium
@pytest.mark.slow
def test_report_renders_in_headless_chromium(run: Path, html: str, tmp_path: Path) -> None:
    url = (run / "report.html").as_uri()
    dom = _chromium(url, tmp_path, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert _console(dom.stderr) == []
    for table in ("table-performance", "table-characteristics", "table-delong", "table-calibration",
                  "table-dca", "table-tripod_items", "table-shap_importance"):  # fmt: skip
        assert f'id="{table}"' in dom.stdout, table
    assert dom.stdout.count("<tr>") > 50
    shot = tmp_path / "report.png"
    proc = _chromium(url, tmp_path, f"--screenshot={shot}", "--window-size=1280,4000", "--hide-scrollbars")
    assert proc.returncode == 0 and _console(proc.stderr) == []
    with Image.open(shot) as img:
        assert img.size == (1280, 4000)
        colours = img.convert("RGB").resize((64, 200)).getcolors(64 * 200)
    assert colours is not None and len(colours) > 20  # rendered content, not a blank page

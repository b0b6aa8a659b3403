"""Render the three marketing reports on realistic data, validate them, and screenshot them in Chromium.

Reports are pages people read, so they are checked as pages: each one is parsed with html5lib in
strict mode (any parse error fails) and rendered by headless Chromium to a full-page PNG that a
person looks at (``bench/results/reports/*.png``). Data:

* **profiles**: the synthetic shop (``features.synthetic``, 3,000 users) and Amazon Beauty
  (S3Rec format: no clock, no money) when ``../shared/data/s3rec/Beauty.txt`` is there;
* **experiment**: ``towerline experiment simulate``'s store (20,000 users, a +10% treatment);
* **campaign**: an outbox and event log built from known per-user responses (email + push,
  a 20% holdout), so the page's incremental figures can be checked against the truth printed here.

Usage::

    python bench/reports.py                      # writes bench/results/reports/
    python bench/reports.py --no-beauty --width 1100
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
BEAUTY = REPO.parent / "shared" / "data" / "s3rec" / "Beauty.txt"
log = logging.getLogger("bench.reports")
DAY = 86_400


def chromium() -> str | None:
    """The headless browser binary, or None (``apt-get install -y chromium``)."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def screenshot(html: Path, png: Path, width: int = 1200, height: int | None = None) -> Path:
    """Full-page PNG of ``html`` (height from the page unless given) by headless Chromium."""
    browser = chromium()
    if browser is None:
        raise RuntimeError("no chromium on PATH; install it with `apt-get install -y chromium`")
    if height is None:
        height = _page_height(browser, html, width)
    with tempfile.TemporaryDirectory() as profile:
        cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={profile}",
               f"--window-size={width},{height}", f"--screenshot={png}", html.resolve().as_uri()]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    return png


def _page_height(browser: str, html: Path, width: int) -> int:
    """The rendered document height, read by dumping the DOM after a script writes it into the title."""
    probe = html.with_suffix(".probe.html")
    probe.write_text(html.read_text().replace(
        "</body>", "<script>document.title='H'+document.documentElement.scrollHeight</script></body>"))
    try:
        with tempfile.TemporaryDirectory() as profile:
            out = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
                                  f"--window-size={width},800", "--dump-dom", probe.resolve().as_uri()],
                                 check=True, capture_output=True, text=True, timeout=120).stdout
        start = out.find("<title>H") + len("<title>H")
        return min(int(out[start: out.find("</title>", start)]) + 40, 16_000)
    except (ValueError, subprocess.SubprocessError):
        return 4000
    finally:
        probe.unlink(missing_ok=True)


def html5_errors(path: Path) -> list[str]:
    """Every parse error html5lib reports for a page (empty list: valid HTML5)."""
    import html5lib

    parser = html5lib.HTMLParser(strict=False)
    parser.parse(path.read_text())
    return [f"{pos}: {err} {args or ''}" for pos, err, args in parser.errors]


def profiles_pages(out: Path, beauty: bool) -> list[Path]:
    from towerline.config import ProfileConfig
    from towerline.features.synthetic import generate_dataset
    from towerline.features.user_features import build_profiles
    from towerline.marketing.clusters import label_clusters
    from towerline.marketing.profile_report import write_profile_report

    pages = []
    ds = generate_dataset(3000, 400, seed=0)
    p = build_profiles(ds, ProfileConfig())
    p["cluster"] = pd.util.hash_pandas_object(p["user_id"], index=False).to_numpy() % 6  # stand-in clusters
    pages.append(write_profile_report(p, out / "profiles-synthetic.html", label_clusters(p), "Customer profiles: synthetic shop"))
    if beauty and BEAUTY.is_file():
        from towerline.features.readers import read_s3rec

        b = build_profiles(read_s3rec(BEAUTY), ProfileConfig())
        pages.append(write_profile_report(b, out / "profiles-beauty.html", None, "Customer profiles: Amazon Beauty"))
    return pages


def experiment_page(out: Path) -> Path:
    from towerline.config import ArmConfig, ExperimentConfig
    from towerline.marketing.experiment_report import experiment_report, write_report
    from towerline.marketing.feedback import FeedbackStore
    from towerline.marketing.simulation import simulate

    exp = ExperimentConfig("home-feed", (ArmConfig("control", share=0.5), ArmConfig("treatment", share=0.5)))
    with tempfile.TemporaryDirectory() as tmp:
        store = FeedbackStore(Path(tmp) / "fb.db")
        simulate(store, exp, 20_000, {"control": (0.05, 0.03, 40.0), "treatment": (0.055, 0.033, 40.0)}, seed=0)
        report = experiment_report(store, exp)
        store.close()
    log.info("experiment verdict: %s", report["verdict"])
    return write_report(report, out)[0]


def campaign_page(out: Path, seed: int = 0) -> tuple[Path, dict]:
    """A campaign with known effects: base conversion 4% in 7 days, +3 points from the e-mail, +2 from the push."""
    from towerline.marketing.campaign_report import CampaignReportSettings, campaign_report, write_campaign_report

    rng = np.random.default_rng(seed)
    t0 = 1_767_225_600
    n = 10_000
    users = [f"c{i:05d}" for i in range(n)]
    hold = rng.random(n) < 0.2
    push = (~hold) & (rng.random(n) < 0.5)
    rows, ev = [], []
    for i, u in enumerate(users):
        rows.append((f"e{i}", "spring-sale", u, "email", ["i1"], "10%", "audience", t0, bool(hold[i])))
        if push[i]:
            rows.append((f"p{i}", "spring-sale", u, "push", ["i1"], None, "audience", t0 + DAY, False))
        if not hold[i]:
            opened = rng.random() < 0.35
            if opened:
                ev.append((u, "-", t0 + 3600, "open", np.nan, None, "email"))
                if rng.random() < 0.3:
                    ev.append((u, "-", t0 + 3700, "click", np.nan, None, "email"))
        p = 0.04 + (0.03 if not hold[i] else 0.0) + (0.02 if push[i] else 0.0)
        if rng.random() < p:
            ev.append((u, "i1", t0 + int(rng.integers(2 * DAY, 6 * DAY)), "purchase", float(rng.gamma(2, 20)), None, "web"))
    outbox = pd.DataFrame(rows, columns=["message_id", "campaign", "user_id", "channel", "items", "offer", "reason",
                                         "sent_at", "holdout"])
    events = pd.DataFrame(ev, columns=["user_id", "item_id", "timestamp", "event_type", "value", "event_id", "channel"])
    report = campaign_report(outbox, events, "spring-sale", CampaignReportSettings())
    truth = {"incremental_conversions": float((~hold).sum() * 0.03 + push.sum() * 0.02)}
    return write_campaign_report(report, out)[0], truth


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "reports")
    p.add_argument("--width", type=int, default=1200)
    p.add_argument("--no-beauty", action="store_true", help="skip the Beauty profile page")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args.out.mkdir(parents=True, exist_ok=True)
    pages = profiles_pages(args.out, not args.no_beauty)
    pages.append(experiment_page(args.out))
    campaign, truth = campaign_page(args.out)
    pages.append(campaign)
    summary = {"pages": {}, "campaign_truth": truth}
    for page in pages:
        errors = html5_errors(page)
        entry: dict = {"html5_errors": errors}
        if chromium():
            entry["screenshot"] = str(screenshot(page, page.with_suffix(".png"), args.width).relative_to(REPO))
        summary["pages"][page.name] = entry
        print(f"{page.name}: {len(errors)} HTML5 parse errors" + (f", screenshot {entry.get('screenshot')}" if chromium() else ""))
    got = json.loads(campaign.with_suffix(".json").read_text())["campaigns"]["spring-sale"]["incremental"]["conversions"]
    print(f"campaign: incremental conversions {got['value']:.0f} [95% CI {got['ci'][0]:.0f}, {got['ci'][1]:.0f}], "
          f"truth {truth['incremental_conversions']:.0f}")
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    return 0 if all(not e["html5_errors"] for e in summary["pages"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())

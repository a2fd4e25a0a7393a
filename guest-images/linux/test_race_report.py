#!/usr/bin/env python3
"""Unit tests of race_report.py: python3 -m unittest discover -s guest-images/linux -p 'test_*.py'"""

import os
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import race_report  # noqa: E402  (after the path tweak)

RESULT = (
    "ibs-race: info result toggles=1200 toggle_ms=3000 longest_toggle_ms=40 fetch_samples=30 op_samples=4 "
    "fetch_stale_samples=0 op_stale_samples=2 lost=0 throttle=1 unthrottle=1 nmi=40 pmi=38 "
    "quiet_ms=300 quiet_nmi=0 quiet_pmi=0 late_records=0 unknown_nmi=0 warnings=0 "
    "slow_nmi_handler=5 took_too_long=0 ibs_log_lines=0"
)
STDOUT = "\n".join([
    "[  300.000000] Run /init as init process",
    "ibs-race: start",
    "ibs-race: FAIL stale-samples: 2 op and 0 fetch samples carry ...",
    RESULT,
    "ibs-race: done: 8 passed, 1 failed (4000 ms)",
    "ibsvm-check: ibs-race: FAIL (status 1)",
    "ibsvm-init: verdict FAIL",
])
STDERR = "\n".join([
    "ibsvm: warn: vCPU 0: guest IBS race on the op unit: enabled from an NMI handler ...",
    "ibsvm stats: exit.kick 1234",
    "ibsvm stats: ibs.races_detected 3",
    "ibsvm stats: ibs.val_written_back 6",
    "ibsvm stats: ibs.stale_val_reads 5",
    "ibsvm stats: ibs.nmis_injected 77",
])


class ParseTest(unittest.TestCase):
    def test_result_line(self):
        r, n = race_report.parse_results(STDOUT)
        self.assertEqual(n, 1)
        self.assertEqual(r["toggles"], 1200)
        self.assertEqual(r["op_stale_samples"], 2)
        self.assertEqual(len(r), 21)

    def test_result_lines_are_summed_and_dashes_skipped(self):
        two = RESULT + "\n" + RESULT.replace("quiet_nmi=0", "quiet_nmi=-").replace(
            "toggles=1200", "toggles=800").replace("longest_toggle_ms=40", "longest_toggle_ms=7")
        r, n = race_report.parse_results(two)
        self.assertEqual((n, r["toggles"], r["quiet_nmi"]), (2, 2000, 0))
        self.assertEqual(r["longest_toggle_ms"], 40, "the longest of all runs, not a sum")
        r, _ = race_report.parse_results(RESULT.replace("quiet_nmi=0", "quiet_nmi=-"))
        self.assertNotIn("quiet_nmi", r)

    def test_kernel_text_inside_the_line(self):
        # A printk that lands in the middle of the line breaks no other token.
        broken = RESULT.replace(" nmi=40", " [ 301.2] INFO: NMI handler took too long nmi=40")
        r, _ = race_report.parse_results(broken)
        self.assertEqual((r["nmi"], r["toggles"]), (40, 1200))

    def test_stats_and_verdict(self):
        s = race_report.parse_stats(STDERR)
        self.assertEqual(s["ibs.races_detected"], 3)
        self.assertEqual(s["exit.kick"], 1234)
        v, failed = race_report.parse_verdict(STDOUT)
        self.assertEqual(v, ["FAIL (status 1)"])
        self.assertEqual(failed, ["stale-samples"])
        self.assertEqual(len(race_report.race_lines(STDERR)), 1)

    def test_per_thousand(self):
        self.assertEqual(race_report.per_thousand(3, 1200), "2.50")
        self.assertEqual(race_report.per_thousand(0, 1500), "0 (95 % upper bound 2)")
        self.assertEqual(race_report.per_thousand(1, 0), "n/a (no toggles)")


class ReportTest(unittest.TestCase):
    def test_complete(self):
        text, ok = race_report.report(STDOUT, STDERR, status=1)
        self.assertTrue(ok)
        self.assertIn("races per 1000 toggles 2.50", text)
        self.assertIn("toggles                1200 in 3000 ms of guest time (400/s), longest 40 ms", text)
        self.assertIn("stale per 1000       1.67", text)
        self.assertIn("Val written back       6 (per 1000 toggles 5.00)", text)
        self.assertIn("ibs.stale_val_reads    5", text)
        self.assertIn("check                  FAIL (status 1) (failed: stale-samples)", text)
        self.assertNotIn("MISSING", text)

    def test_missing_numbers(self):
        _, ok = race_report.report("no guest output", STDERR)
        self.assertFalse(ok)
        text, ok = race_report.report(STDOUT, "no stats")
        self.assertFalse(ok)
        self.assertIn("MISSING: ibsvm's", text)

    def test_main_exit_status(self):
        import tempfile
        with tempfile.TemporaryDirectory() as d:
            out, err = os.path.join(d, "out"), os.path.join(d, "err")
            with open(out, "w") as f:
                f.write(STDOUT)
            with open(err, "w") as f:
                f.write(STDERR)
            self.assertEqual(race_report.main(["--parse", out, err, "--status", "1"]), 0)
            self.assertEqual(race_report.main(["--parse", err, err]), 1)
        self.assertEqual(race_report.main([]), 2)
        self.assertEqual(race_report.main(["--", "/nonexistent/ibsvm"]), 1)


if __name__ == "__main__":
    unittest.main()

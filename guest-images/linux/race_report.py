#!/usr/bin/env python3
"""The report of `make race-linux`: how often stock Linux is caught in the IBS race.

Runs an `ibsvm run ...` command line that boots the Linux guest with the `ibs-race`
check (guest-images/linux/checks/src/bin/ibs-race.rs), passes its console and
messages through, then prints what the guest and ibsvm counted:

    python3 guest-images/linux/race_report.py -- target/release/ibsvm run ... --stats
    python3 guest-images/linux/race_report.py --parse boot.out boot.err [--status N]

The guest prints one line `ibs-race: info result KEY=VALUE ...` (toggles, samples,
stale samples, NMIs, ...); ibsvm prints `ibsvm stats: NAME N` lines on stderr with
`--stats` (`ibs.races_detected`: the guest enabled a unit from its NMI handler right
after reading a stale Val). Exit status 0 when both were found, whatever they say
(the check FAILs when the race happened, and that is the finding); 1 when the boot
did not produce them; 2 on a usage error. Python 3 standard library only.
"""

import re
import subprocess
import sys
import threading

RESULT_MARK = "ibs-race: info result "
STATS_PREFIX = "ibsvm stats: "
# A token of the result line; kernel messages printed on the console in the middle of
# the line cannot forge one (they have no KEY=number shape with these keys).
PAIR = re.compile(r"^([a-z_]+)=(\d+|-)$")
# The stats the report uses; missing ones are reported as such.
STATS = ("ibs.races_detected", "ibs.val_written_back", "ibs.stale_val_reads", "ibs.nmis_injected",
         "ibs.samples_latched")
# Result keys combined over several runs by their maximum; all others are summed.
MAX_KEYS = ("longest_toggle_ms",)


def parse_results(stdout):
    """Sums the numbers of every `ibs-race: info result` line (one per run of the
    check, several with ibsvm.repeat=N; MAX_KEYS take the maximum). Returns (dict,
    line count); a key whose value was `-` (that step did not run) in every line is
    absent."""
    totals = {}
    count = 0
    for line in stdout.splitlines():
        at = line.find(RESULT_MARK)
        if at < 0:
            continue
        count += 1
        for token in line[at + len(RESULT_MARK):].split():
            m = PAIR.match(token)
            if m and m.group(2) != "-":
                key, value = m.group(1), int(m.group(2))
                combine = max if key in MAX_KEYS else (lambda a, b: a + b)
                totals[key] = combine(totals.get(key, 0), value)
    return totals, count


def parse_stats(stderr):
    """`ibsvm stats: NAME N` lines as a dict."""
    stats = {}
    for line in stderr.splitlines():
        if not line.startswith(STATS_PREFIX):
            continue
        parts = line[len(STATS_PREFIX):].split()
        if len(parts) == 2 and parts[1].isdigit():
            stats[parts[0]] = int(parts[1])
    return stats


def parse_verdict(stdout):
    """The check's verdict lines (`ibsvm-check: ibs-race: PASS|FAIL ...`) and the
    names of its failed results (`ibs-race: FAIL NAME: ...`)."""
    verdicts = []
    failed = []
    for line in stdout.splitlines():
        m = re.search(r"ibsvm-check: ibs-race: (PASS|FAIL.*)$", line)
        if m:
            verdicts.append(m.group(1).strip())
        m = re.search(r"ibs-race: FAIL ([A-Za-z0-9_-]+):", line)
        if m and m.group(1) not in failed:
            failed.append(m.group(1))
    return verdicts, failed


def race_lines(stderr):
    """ibsvm's own race reports (the first few per vCPU are logged)."""
    return [l for l in stderr.splitlines() if "guest IBS race" in l]


def per_thousand(events, toggles):
    """`events` per 1000 `toggles`, as text; with no event, the 95 % upper bound
    (rule of three: 3/N)."""
    if not toggles:
        return "n/a (no toggles)"
    if events == 0:
        return "0 (95 %% upper bound %.2g)" % (3000.0 / toggles)
    return "%.2f" % (1000.0 * events / toggles)


def report(stdout, stderr, status=None):
    """The report text and whether the numbers were there."""
    results, lines = parse_results(stdout)
    stats = parse_stats(stderr)
    verdicts, failed = parse_verdict(stdout)
    out = ["", "=== ibs-race: stock Linux and the stale-IbsOpVal race ==="]
    missing = []
    if lines == 0 or "toggles" not in results:
        missing.append("the guest's 'ibs-race: info result' line")
    if "ibs.races_detected" not in stats:
        missing.append("ibsvm's 'ibsvm stats: ibs.races_detected' line (run with --stats)")
    if status is not None:
        out.append("ibsvm exit status      %s" % status)
    if verdicts:
        verdict = ", ".join(verdicts)
        if failed:
            verdict += " (failed: %s)" % ", ".join(failed)
        out.append("check                  %s" % verdict)

    def get(key):
        return results.get(key, "?")

    toggles = results.get("toggles", 0)
    ms = results.get("toggle_ms", 0)
    races = stats.get("ibs.races_detected")
    if "toggles" in results:
        rate = " (%.0f/s)" % (1000.0 * toggles / ms) if ms else ""
        out.append("toggles                %d in %d ms of guest time%s, longest %s ms"
                   % (toggles, ms, rate, get("longest_toggle_ms")))
    if races is not None:
        out.append("races (ibsvm)          %d  ibs.races_detected" % races)
        out.append("races per 1000 toggles %s" % per_thousand(races, toggles))
    written_back = stats.get("ibs.val_written_back")
    if written_back is not None:
        # The race's first half: perf_ibs_stop wrote a latched sample's Val=1 back.
        out.append("Val written back       %d (per 1000 toggles %s): stop left the stale state"
                   % (written_back, per_thousand(written_back, toggles)))
    for name in STATS[2:]:
        if name in stats:
            out.append("%-22s %d" % (name, stats[name]))
    if lines:
        stale = results.get("op_stale_samples", 0) + results.get("fetch_stale_samples", 0)
        out += [
            "guest, %d run%s:" % (lines, "" if lines == 1 else "s"),
            "  stale samples        op %s, fetch %s (CTL Val=1 En=0: the handler took a stale Val)"
            % (get("op_stale_samples"), get("fetch_stale_samples")),
            "  stale per 1000       %s" % per_thousand(stale, toggles),
            "  samples              fetch %s, op %s, lost %s" % (
                get("fetch_samples"), get("op_samples"), get("lost")),
            "  NMIs while toggling  %s (claimed by perf: %s)" % (get("nmi"), get("pmi")),
            "  quiet-period NMIs    %s in %s ms, late ring records %s" % (
                get("quiet_nmi"), get("quiet_ms"), get("late_records")),
            "  throttle records     %s (unthrottle %s)" % (get("throttle"), get("unthrottle")),
            "  unknown-NMI lines    %s" % get("unknown_nmi"),
            "  WARNING/BUG lines    %s" % get("warnings"),
            "  slow NMI handler     %s lines, 'interrupt took too long' %s" % (
                get("slow_nmi_handler"), get("took_too_long")),
        ]
    shown = race_lines(stderr)
    if shown:
        out.append("ibsvm race reports (%d logged):" % len(shown))
        out += ["  " + l.strip() for l in shown[:3]]
    if missing:
        out.append("MISSING: " + "; ".join(missing) + " - the boot did not produce the numbers")
    return "\n".join(out), not missing


def pump(src, dst, keep):
    """Copies lines from `src` to `dst` (flushing) and keeps them in the list `keep`."""
    for raw in iter(src.readline, b""):
        dst.buffer.write(raw)
        dst.flush()
        keep.append(raw.decode("utf-8", "replace"))
    src.close()


def run(cmd):
    """Runs `cmd`, teeing its stdout and stderr; returns (stdout, stderr, status)."""
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    out, err = [], []
    threads = [threading.Thread(target=pump, args=(proc.stdout, sys.stdout, out)),
               threading.Thread(target=pump, args=(proc.stderr, sys.stderr, err))]
    for t in threads:
        t.start()
    status = proc.wait()
    for t in threads:
        t.join()
    return "".join(out), "".join(err), status


def main(argv):
    if argv[:1] == ["--parse"] and len(argv) in (3, 5):
        with open(argv[1], encoding="utf-8", errors="replace") as f:
            stdout = f.read()
        with open(argv[2], encoding="utf-8", errors="replace") as f:
            stderr = f.read()
        status = int(argv[4]) if len(argv) == 5 and argv[3] == "--status" else None
    elif argv[:1] == ["--"] and len(argv) > 1:
        try:
            stdout, stderr, status = run(argv[1:])
        except OSError as e:
            print("race_report: cannot run %s: %s" % (argv[1], e), file=sys.stderr)
            return 1
    else:
        print(__doc__.strip().split("\n\n")[1], file=sys.stderr)
        return 2
    text, complete = report(stdout, stderr, status)
    print(text)
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

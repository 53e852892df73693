#!/usr/bin/env python3
"""Runs `cargo test --locked --no-fail-fast ARGS` and passes its output through.

One failure is run again: a test binary that librdkafka's mock cluster aborted. When a test
stops a mock broker, the mock closes the broker's listening socket and binds the same port again
at once, and it asserts (aborting the whole test process) if that bind or the later listen
fails. That is a race with the machine's other sockets, not a verdict on kafboy, and it takes
every test of that binary with it. Such a binary (killed by SIGABRT, with an assertion in
rdkafka_mock.c in its output) is run once more on its own; any other failure fails the run.
"""

import re
import subprocess
import sys

# Where the output of one test binary (or of the doc tests) begins.
SECTION = re.compile(r"^\s+(?:Running (?:unittests )?\S+ \(|Doc-tests )")
RERUN = re.compile(r"to rerun pass `([^`]+)`")
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# A test of the binary failed on its own before any abort: not the mock cluster's doing.
OWN_FAILURE = re.compile(r"\.\.\. FAILED$|panicked at ", re.MULTILINE)


def run(args):
    """Runs cargo test with `args`, echoing its output; returns (exit code, output lines)."""
    proc = subprocess.Popen(["cargo", "test", "--locked", "--no-fail-fast", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace")
    lines = []
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        lines.append(line)
    return proc.wait(), lines


def failed_targets(lines):
    """(target arguments, whether the mock cluster aborted it and nothing else failed in it)
    for each failed test binary."""
    failed, section = [], []
    for line in [ANSI.sub("", l) for l in lines] + ["     Running end ("]:
        if SECTION.match(line):
            text = "".join(section)
            for target in RERUN.findall(text):
                aborted = ("SIGABRT" in text and "rdkafka_mock.c" in text and "Assertion" in text
                           and not OWN_FAILURE.search(text))
                failed.append((target, aborted))
            section = []
        section.append(line)
    return failed


def main():
    args = sys.argv[1:]
    code, lines = run(args)
    if code == 0:
        return 0
    failed = failed_targets(lines)
    if not failed or not all(aborted for _, aborted in failed):
        return code or 1
    for target, _ in failed:
        print(f"\n*** {target}: librdkafka's mock cluster aborted the test process (a port "
              f"race when a mock broker is stopped); running it once more on its own ***\n",
              flush=True)
        again, _ = run([*target.split(), *args])
        if again != 0:
            return again
    return 0


if __name__ == "__main__":
    sys.exit(main())

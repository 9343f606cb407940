"""The CPU percentage of `berth stats`: the difference of two cgroup readings."""

from __future__ import annotations

from berthd.node.cgroups import CpuReading, cpu_percent

MS = 1_000_000  # nanoseconds


def test_one_busy_cpu_is_100_percent() -> None:
    assert cpu_percent(CpuReading(0, 5 * MS), CpuReading(100 * MS, 105 * MS)) == 100.0


def test_percent_of_one_cpu_exceeds_100_with_two_busy() -> None:
    assert cpu_percent(CpuReading(0, 0), CpuReading(100 * MS, 200 * MS)) == 200.0


def test_a_quarter_and_rounding() -> None:
    assert cpu_percent(CpuReading(10, 0), CpuReading(10 + 1000 * MS, 250 * MS)) == 25.0
    assert cpu_percent(CpuReading(0, 0), CpuReading(3 * MS, 1 * MS)) == 33.33


def test_idle_is_zero() -> None:
    assert cpu_percent(CpuReading(0, 7 * MS), CpuReading(100 * MS, 7 * MS)) == 0.0


def test_no_time_between_readings_is_zero_not_a_division_error() -> None:
    assert cpu_percent(CpuReading(5, 0), CpuReading(5, 9 * MS)) == 0.0


def test_a_counter_that_went_back_reads_as_idle() -> None:
    # A restarted container has a new cgroup whose counter starts again from 0.
    assert cpu_percent(CpuReading(0, 900 * MS), CpuReading(100 * MS, 3 * MS)) == 0.0

import pytest

from sidecar.clock import FakeClock
from sidecar.config.settings import RetryBudget as BudgetPolicy
from sidecar.resilience.budget import RetryBudget, RetryBudgets, SlidingCount


def test_sliding_count_forgets_after_the_window() -> None:
    clock = FakeClock(start=100.05)
    count = SlidingCount(10.0, clock)
    count.add()
    count.add()
    clock.advance(5)
    count.add()
    assert count.count() == 3
    clock.advance(5.2)  # the first two are now over 10 s old
    assert count.count() == 1
    clock.advance(5)
    assert count.count() == 0


def test_sliding_count_keeps_fixed_memory() -> None:
    clock = FakeClock()
    count = SlidingCount(10.0, clock)
    for _ in range(10_000):
        count.add()
        clock.advance(0.001)
    assert count.count() == 10_000
    assert len(count._slots) <= 101


def test_floor_allows_min_per_second_times_window_without_traffic() -> None:
    budget = RetryBudget(BudgetPolicy(ratio=0.2, min_per_second=1, window=10), FakeClock())
    allowed = 0
    while budget.can_retry():
        budget.record_retry()
        allowed += 1
    assert allowed == 10


def test_requests_add_ratio() -> None:
    budget = RetryBudget(BudgetPolicy(ratio=0.5, min_per_second=0, window=10), FakeClock())
    assert not budget.can_retry()
    for _ in range(4):
        budget.record_request()
    assert budget.allowance() == 2
    budget.record_retry()
    budget.record_retry()
    assert not budget.can_retry()


def test_retries_come_back_as_the_window_slides() -> None:
    clock = FakeClock(start=500.05)
    budget = RetryBudget(BudgetPolicy(ratio=0, min_per_second=0.5, window=4), clock)
    budget.record_retry()
    budget.record_retry()
    assert not budget.can_retry()
    clock.advance(4.2)
    assert budget.can_retry()


def test_old_requests_stop_counting() -> None:
    clock = FakeClock(start=500.05)
    budget = RetryBudget(BudgetPolicy(ratio=1, min_per_second=0, window=10), clock)
    budget.record_request()
    assert budget.can_retry()
    clock.advance(10.2)
    assert not budget.can_retry()


def test_negative_settings_refused() -> None:
    with pytest.raises(ValueError):
        RetryBudget(BudgetPolicy(ratio=-1), FakeClock())
    with pytest.raises(ValueError):
        RetryBudget(BudgetPolicy(window=0), FakeClock())


def test_registry_is_per_service_and_keeps_state_on_unchanged_reload() -> None:
    clock = FakeClock()
    tight = BudgetPolicy(ratio=0, min_per_second=0.1, window=10)
    budgets = RetryBudgets({"a": tight, "b": tight}, clock)
    budgets.for_service("a").record_retry()
    assert not budgets.for_service("a").can_retry()
    assert budgets.for_service("b").can_retry()
    budgets.reload({"a": tight, "b": BudgetPolicy()})
    assert not budgets.for_service("a").can_retry()  # unchanged: state kept
    assert budgets.for_service("b").policy == BudgetPolicy()
    assert budgets.for_service("unknown").policy == BudgetPolicy()

"""Reward-function calls that hang are quarantined after scorer.reward_timeout_s; too many hung
calls at once stop the scorer with an error naming the reward."""

import threading
import time

import pytest

from rlhf_ray.config import ConfigError, load_config
from rlhf_ray.scoring.scorer import RewardScorer
from rlhf_ray.types import Rollout, RolloutBatch
from tests.conftest import tiny_config
from tests.scoring import rewards_for_tests

SPEC = "tests.scoring.rewards_for_tests:hang_on_marker"


@pytest.fixture(autouse=True)
def _hangs():
    rewards_for_tests.RELEASE.clear()
    rewards_for_tests.CALLS.clear()
    rewards_for_tests.THREADS.clear()
    yield
    rewards_for_tests.RELEASE.set()  # no test leaves a call hanging


def _batch(texts, groups):
    return RolloutBatch([
        Rollout(uid=f"{g}/{i}/0", prompt_uid=g, group_id=f"{g}/0", prompt_text="p",
                response_text=t, prompt_ids=[5, 6], response_ids=[7, 8, 9],
                behavior_logprobs=[-1.0, -1.0, -1.0], finish_reason="length", policy_version=0)
        for i, (t, g) in enumerate(zip(texts, groups))
    ])


def _wait_until(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_a_hanging_call_is_quarantined_and_the_others_become_rows():
    scorer = RewardScorer(tiny_config(f"scorer.reward={SPEC}", "scorer.reward_timeout_s=0.5"))
    texts = ["a", "hang-1", "aaa", "bb", "hang-2", "bbbb"]
    groups = ["a", "a", "a", "b", "b", "b"]
    start = time.perf_counter()
    report, table = scorer.score(_batch(texts, groups), return_table=True)
    elapsed = time.perf_counter() - start
    # two hangs of 2 s each, waited for 0.5 s each: well under one hang, let alone two
    assert elapsed < rewards_for_tests.HANG_S
    assert report.quarantined == 2
    assert sorted(q["uid"] for q in report.quarantine) == ["a/1/0", "b/4/0"]
    assert {q["reason"] for q in report.quarantine} == {
        "timed out after 0.5s (scorer.reward_timeout_s)"}
    assert report.stats["reward/quarantined"] == 2.0
    rewards = dict(zip(table.column("response_text").to_pylist(),
                       table.column("reward").to_pylist()))
    assert rewards == {"a": 1.0, "aaa": 3.0, "bb": 2.0, "bbbb": 4.0}
    # the calls after a hung one ran (on a fresh thread), in order
    assert rewards_for_tests.CALLS == texts
    threads = rewards_for_tests.THREADS
    assert threading.current_thread().name not in threads
    assert threads[0] == threads[1] != threads[2] == threads[3] != threads[5]
    assert scorer._runner.hung == 2
    rewards_for_tests.RELEASE.set()
    assert _wait_until(lambda: scorer._runner.hung == 0)  # finished late: no longer counted


def test_the_deadline_counts_from_each_call_start_not_the_batch_start():
    scorer = RewardScorer(tiny_config(f"scorer.reward={SPEC}", "scorer.reward_timeout_s=0.4"))
    texts = [f"slow-{i}" for i in range(6)]  # 0.15 s each, 0.9 s in all
    values, reasons = scorer._rewards(_batch(texts, ["a"] * 6))
    assert values == [6.0] * 6 and reasons == [""] * 6
    assert scorer._runner.hung == 0


def test_too_many_hung_calls_raise_naming_the_reward_until_they_return():
    scorer = RewardScorer(tiny_config(f"scorer.reward={SPEC}", "scorer.reward_timeout_s=0.2",
                                      "scorer.max_hung_rewards=1"))
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match=r"scorer\.reward='tests\.scoring\.rewards_for_tests:"
                                           r"hang_on_marker': 2 reward calls are still running"):
        scorer._rewards(_batch(["ok-1", "hang-1", "hang-2", "ok-2"], ["a"] * 4))
    assert time.perf_counter() - start < rewards_for_tests.HANG_S
    # while they still hang, the next batch fails at once, without calling the reward
    with pytest.raises(RuntimeError, match="scorer.max_hung_rewards=1"):
        scorer._rewards(_batch(["ok-3"], ["a"]))
    assert rewards_for_tests.CALLS == ["ok-1", "hang-1", "hang-2"]
    rewards_for_tests.RELEASE.set()
    assert _wait_until(lambda: scorer._runner.hung == 0)
    values, reasons = scorer._rewards(_batch(["ok-4", "ok-55"], ["a", "a"]))
    assert values == [4.0, 5.0] and reasons == ["", ""]
    # "ok-2", queued behind the batch that failed, was cancelled and never ran
    assert rewards_for_tests.CALLS == ["ok-1", "hang-1", "hang-2", "ok-4", "ok-55"]


def test_timeout_zero_calls_the_reward_directly():
    scorer = RewardScorer(tiny_config(f"scorer.reward={SPEC}", "scorer.reward_timeout_s=0"))
    values, reasons = scorer._rewards(_batch(["slow-1", "aa"], ["a", "a"]))
    assert scorer._runner is None
    assert rewards_for_tests.THREADS == [threading.current_thread().name] * 2
    assert values == [6.0, 2.0] and reasons == ["", ""]


@pytest.mark.parametrize("override", ["scorer.reward_timeout_s=-1", "scorer.reward_timeout_s=inf",
                                      "scorer.max_hung_rewards=-1"])
def test_bad_timeout_settings_are_rejected(override):
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
        load_config(preset="tiny", overrides=[override])

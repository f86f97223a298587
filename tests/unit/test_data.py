"""Text tasks for fine-tuning and distillation: the tweet corpus's cleaning, deduplication and
stratified split, and the SMS task's splits (the spam-encoder's test split kept)."""

from __future__ import annotations

from collections import Counter

import pytest

from models import data


@pytest.fixture(scope="module")
def tweets() -> data.TextTask:
    return data.text_task("tweets")


def test_tweets_are_cleaned_deduplicated_and_counted(tweets):
    notes = tweets.notes
    assert notes["rows"] == 38158 and notes["undecodable_rows"] == 4934
    assert notes["kept"] == notes["rows"] - notes["duplicates_dropped"] - notes["conflicting_texts_dropped"]
    everything = tweets.train.texts + tweets.validation.texts + tweets.test.texts
    assert len(everything) == notes["kept"]
    keys = [data.normalise(t) for t in everything]
    assert len(set(keys)) == len(keys)  # no text twice, so none crosses splits


def test_tweet_split_is_stratified_80_10_10(tweets):
    assert tweets.labels == ("negative", "neutral", "positive")
    total = Counter(tweets.train.labels + tweets.validation.labels + tweets.test.labels)
    for split, share in ((tweets.train, 0.8), (tweets.validation, 0.1), (tweets.test, 0.1)):
        counts = Counter(split.labels)
        for label, n in total.items():
            assert abs(counts[label] - share * n) <= 1


def test_tweet_split_is_fixed(tweets):
    again = data.text_task("tweets")
    assert again.test.texts == tweets.test.texts and again.train.labels == tweets.train.labels


def test_mojibake_runs_become_one_space():
    assert data.clean_tweet(b"don\xd5\xa2_\x8a\xce_\x86\xa2t go") == "don t go"
    assert data.clean_tweet("caf\u00e9 ok".encode()) == "caf\u00e9 ok"


def test_sms_task_keeps_the_spam_test_split():
    task = data.text_task("sms")
    spam = data.spam_dataset(64, 8)
    assert task.test.texts == spam.test_texts
    assert len(task.train) + len(task.validation) == len(spam.train)
    assert len(task.validation) == len(spam.train) // 8
    assert Counter(task.validation.labels)[1] > 0 and 0 < task.notes["test_texts_also_in_train"] < len(task.test)


def test_unknown_task_is_refused():
    with pytest.raises(data.DatasetError, match="unknown text task"):
        data.text_task("imdb")

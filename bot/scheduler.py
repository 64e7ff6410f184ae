"""finbot's background scheduler: a thin wrapper over APScheduler 3's BackgroundScheduler.

Features register plain callables; the wrapper owns the timezone, the misfire policy and the
lifecycle (`finbot run` starts it after Slack is connected and shuts it down on SIGTERM).

    scheduler = FinbotScheduler("Asia/Seoul")
    scheduler.add_daily_job("term-of-day", service.run_due, at=time(9, 0), misfire_grace=timedelta(hours=6))
    scheduler.add_startup_job("term-of-day-catch-up", service.run_due)
    scheduler.start()

Misfires: a daily job that could not run on time (process busy, machine suspended) still runs when
the scheduler notices, as long as it is within `misfire_grace`; several missed runs are coalesced
into one. Jobs must therefore be idempotent and check for themselves whether they are still due
(the term of the day does: it claims (channel, date) in the database and checks its time window).
Jobs never overlap themselves (max_instances=1). An exception in a job is logged, never raised.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, time, timedelta
from zoneinfo import ZoneInfo

from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_MISSED, JobExecutionEvent
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger

logger = logging.getLogger(__name__)


def daily_trigger(at: time, timezone: str) -> CronTrigger:
    """A trigger firing every day at `at`, local time."""
    return CronTrigger(hour=at.hour, minute=at.minute, second=at.second, timezone=ZoneInfo(timezone))


class FinbotScheduler:
    def __init__(self, timezone: str) -> None:
        self.timezone = ZoneInfo(timezone)
        # Every job: missed runs coalesced into one, never two runs of a job at once.
        self._scheduler = BackgroundScheduler(
            timezone=self.timezone,
            job_defaults={"coalesce": True, "max_instances": 1},
        )
        self._scheduler.add_listener(self._on_event, EVENT_JOB_ERROR | EVENT_JOB_MISSED)

    def add_daily_job(
        self,
        job_id: str,
        func: Callable[[], object],
        *,
        at: time,
        misfire_grace: timedelta = timedelta(hours=1),
    ) -> None:
        """Run `func()` every day at `at` in the scheduler's timezone; replaces a job with the same id."""
        self._scheduler.add_job(
            func,
            trigger=daily_trigger(at, str(self.timezone)),
            id=job_id,
            name=job_id,
            replace_existing=True,
            misfire_grace_time=max(1, int(misfire_grace.total_seconds())),
            coalesce=True,
            max_instances=1,
        )
        logger.info("scheduled daily job %s at %s (%s)", job_id, at.strftime("%H:%M"), self.timezone)

    def add_startup_job(self, job_id: str, func: Callable[[], object], *, delay: timedelta = timedelta(0)) -> None:
        """Run `func()` once, `delay` after the scheduler starts (e.g. a catch-up after downtime)."""
        self._scheduler.add_job(
            func,
            trigger=DateTrigger(run_date=datetime.now(self.timezone) + delay, timezone=self.timezone),
            id=job_id,
            name=job_id,
            replace_existing=True,
            # A one-off run must not be dropped as "missed" because start() came a little later.
            misfire_grace_time=None,
        )

    def add_interval_job(self, job_id: str, func: Callable[[], object], *, every: timedelta) -> None:
        """Run `func()` every `every` from now on (a missed run is skipped, not made up)."""
        self._scheduler.add_job(
            func,
            trigger=IntervalTrigger(seconds=max(1, int(every.total_seconds())), timezone=self.timezone),
            id=job_id,
            name=job_id,
            replace_existing=True,
        )

    def remove_job(self, job_id: str) -> bool:
        """Unschedule `job_id`; False when there was no such job."""
        if self._scheduler.get_job(job_id) is None:
            return False
        self._scheduler.remove_job(job_id)
        return True

    def next_run_time(self, job_id: str) -> datetime | None:
        job = self._scheduler.get_job(job_id)
        # Jobs added before start() are pending and have no next_run_time attribute yet.
        return None if job is None else getattr(job, "next_run_time", None)

    def job_ids(self) -> list[str]:
        return [job.id for job in self._scheduler.get_jobs()]

    @property
    def running(self) -> bool:
        return self._scheduler.running

    def start(self) -> None:
        self._scheduler.start()
        logger.info("scheduler started with jobs %s", ", ".join(self.job_ids()) or "(none)")

    def shutdown(self, wait: bool = True) -> None:
        if self._scheduler.running:
            self._scheduler.shutdown(wait=wait)
            logger.info("scheduler stopped")

    @staticmethod
    def _on_event(event: JobExecutionEvent) -> None:
        if event.code == EVENT_JOB_MISSED:
            logger.warning("job %s missed its run at %s (past its misfire grace)", event.job_id, event.scheduled_run_time)
        elif event.exception is not None:
            logger.error("job %s failed: %r\n%s", event.job_id, event.exception, event.traceback or "")

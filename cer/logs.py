"""Logging: loguru for cer, with the standard library's records (pykka's among them) routed into it."""

import logging
import sys

from loguru import logger


class _InterceptHandler(logging.Handler):
    """Hands standard logging records to loguru (the loguru README's recipe), so actor crashes show."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        logger.opt(exception=record.exc_info, depth=6).log(level, record.getMessage())


def setup_logging(debug: bool) -> None:
    logger.remove()
    logger.add(
        sys.stderr,
        level="DEBUG" if debug else "INFO",
        format="<green>{time:YYYY-MM-DD HH:mm:ss.SSS}</green> <level>{level: <7}</level> {thread.name}: {message}",
        backtrace=False,
        diagnose=False,
    )
    logging.basicConfig(handlers=[_InterceptHandler()], level=0, force=True)
    # pykka logs every exception an ask returns at INFO: mostly answered requests (not found, not ready),
    # but also failures in messages nobody waits for, so --debug shows them.
    logging.getLogger("pykka").setLevel(logging.INFO if debug else logging.WARNING)

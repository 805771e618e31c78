"""Logging rules every SkinScan process applies, whatever SKINSCAN_LOG_LEVEL says."""

from __future__ import annotations

import logging

# Client libraries whose DEBUG records carry request signatures, the access key id (`Credential=`) and
# presigned URLs: capped at INFO, so SKINSCAN_LOG_LEVEL=DEBUG debugs SkinScan, not the storage credentials.
QUIET_LIBRARIES = ("botocore", "boto3", "s3transfer", "urllib3")


def cap_library_loggers(level: int = logging.INFO) -> None:
    """Raise the chatty client libraries' loggers to at least `level` (never lowers a stricter one)."""
    for name in QUIET_LIBRARIES:
        logger = logging.getLogger(name)
        if logger.level < level:  # NOTSET (0) included: it would inherit the root's DEBUG
            logger.setLevel(level)

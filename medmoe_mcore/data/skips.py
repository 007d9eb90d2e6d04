"""Why a record is skipped while data are prepared or encoded: each reason is counted and
reported, never silent."""

REASONS = ("malformed", "missing_image", "corrupt_image", "image_too_large",
           "path_outside_root", "no_image_token", "image_count_mismatch", "empty_answer",
           "unknown_role", "not_utf8", "too_long", "dicom_frame_missing", "too_many_images")


class SkipRecord(ValueError):
    def __init__(self, reason: str, detail: str = ""):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason

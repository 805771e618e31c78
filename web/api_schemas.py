"""Marshmallow schemas of the API's main request and response bodies, as the OpenAPI document shows them.

Views name them with `web.openapi.doc`; a field an answer may leave out is not `required`, one that may be null is
`allow_none`. Status fields are documented strings rather than enums, so a new status never breaks the document.
"""

from __future__ import annotations

from marshmallow import INCLUDE, Schema, fields
from marshmallow.validate import OneOf, Range

from skinscan.changes import PAGE_MAX
from skinscan.labels import CLASSES

BINARY = {"type": "string", "format": "binary"}


class Body(Schema):
    """A JSON object that may carry fields besides those documented (a new field never breaks a client)."""

    class Meta:
        unknown = INCLUDE


class ErrorSchema(Body):
    """Every error answer: a message and the HTTP status (and per-item details where there are several)."""

    error = fields.String(required=True)
    status = fields.Integer(required=True)
    details = fields.List(fields.Dict())


class JobCountsSchema(Body):
    """Images of a job by outcome."""

    total = fields.Integer(required=True, metadata={"description": "images accepted (refused files not included)"})
    scored = fields.Integer(required=True)
    failed = fields.Integer(required=True, metadata={"description": "accepted images that could not be scored"})
    refused = fields.Integer(required=True, metadata={"description": "files refused at upload, never stored"})
    cancelled = fields.Integer(metadata={"description": "a cancelled job's images left unscored"})


class JobSchema(Body):
    """A job's status, counts and progress."""

    id = fields.String(required=True)
    name = fields.String(allow_none=True, metadata={"description": "batch name or reference given at upload"})
    status = fields.String(required=True, metadata={
        "description": "uploading, queued, running, done, failed or cancelled"})
    kind = fields.String()
    counts = fields.Nested(JobCountsSchema, required=True)
    progress = fields.Float(required=True, validate=Range(0, 1))
    model_version = fields.String(allow_none=True)
    created_at = fields.String(allow_none=True, metadata={"format": "date-time"})
    started_at = fields.String(allow_none=True, metadata={"format": "date-time"})
    finished_at = fields.String(allow_none=True, metadata={"format": "date-time"})
    has_labels = fields.Boolean()
    error = fields.String(allow_none=True)
    parts = fields.Integer(metadata={"description": "upload parts the job has received"})
    status_url = fields.String()


class JobCreatedSchema(JobSchema):
    """A job that received images: the job, where its results will be, and what was accepted or refused."""

    results_url = fields.String()
    accepted = fields.Integer()
    rejected = fields.List(fields.Dict(), metadata={"description": "refused files, each with the reason"})
    resumed = fields.Boolean(metadata={"description": "the job of this batch_key existed: nothing was stored"})
    duplicate_part = fields.Boolean(metadata={"description": "this part was received before: not stored again"})
    labels = fields.Dict(metadata={
        "description": "with a labels CSV: images labelled, images without a row, and label rows that matched no "
                       "uploaded image (ignored): labelled, unlabelled, unmatched_label_rows, labels_summary"})


class JobPageSchema(Body):
    """A page of the clinic's jobs, newest first."""

    page = fields.Integer(required=True)
    per_page = fields.Integer(required=True)
    total = fields.Integer(required=True)
    jobs = fields.List(fields.Nested(JobSchema), required=True)


class ResultSchema(Body):
    """One uploaded image's result under the current model (no prediction while pending, failed or cancelled)."""

    image_id = fields.String(required=True)
    filename = fields.String()
    status = fields.String(metadata={"description": "pending, scored, failed or cancelled"})
    predicted_label = fields.String(allow_none=True, metadata={"description": "one of the model's classes"})
    probabilities = fields.Dict(keys=fields.String(), values=fields.Float(), allow_none=True, metadata={
        "description": "probability of each of the model's classes, e.g. " + ", ".join(CLASSES)})
    confidence = fields.Float(allow_none=True)
    malignancy_score = fields.Float(allow_none=True)
    flagged = fields.Boolean(allow_none=True)
    model_version = fields.String(allow_none=True)
    true_label = fields.String(allow_none=True)
    error = fields.String(allow_none=True)
    flag_reason = fields.String(metadata={"description": "why the image is flagged for referral (empty if not)"})
    review_decision = fields.String(allow_none=True)
    review_diagnosis = fields.String(allow_none=True)
    reviewed_by = fields.String(allow_none=True)
    reviewed_at = fields.String(allow_none=True)


class ResultsPageSchema(Body):
    """A page of a job's per-image results."""

    job = fields.Nested(JobSchema, required=True)
    offset = fields.Integer()
    limit = fields.Integer()
    total = fields.Integer()
    results = fields.List(fields.Nested(ResultSchema), required=True)


class JobMetricsSchema(Body):
    """A finished job's metrics (with labels: accuracy, balanced accuracy, per-class figures, AUC)."""

    job = fields.Nested(JobSchema, required=True)
    metrics = fields.Dict(required=True)


class ModelVersionSchema(Body):
    """A registered model version."""

    version = fields.String(required=True)
    status = fields.String(metadata={"description": "registered, production or retired"})
    in_production = fields.Boolean()
    architecture = fields.String()
    checksum = fields.String()
    classes = fields.List(fields.String(), allow_none=True)
    input_size = fields.Integer(allow_none=True)
    referral = fields.Dict(allow_none=True)
    registered_at = fields.String(allow_none=True)
    promoted_at = fields.String(allow_none=True)


class ModelListSchema(Body):
    """Registered model versions and the one in production."""

    production = fields.String(allow_none=True)
    models = fields.List(fields.Nested(ModelVersionSchema), required=True)


class RescoreScopeSchema(Body):
    """What a re-score run covered."""

    clinic = fields.Boolean()
    since = fields.String(allow_none=True)


class RescoreRunSchema(Body):
    """A re-score run's progress and summary, counted for the clinic."""

    id = fields.Integer(required=True)
    status = fields.String(metadata={"description": "running, done or superseded"})
    model_from = fields.String(allow_none=True)
    model_to = fields.String()
    scope = fields.Nested(RescoreScopeSchema)
    images = fields.Integer()
    done = fields.Integer()
    failed = fields.Integer()
    progress = fields.Float(validate=Range(0, 1))
    changed = fields.Integer()
    flagged = fields.Integer(metadata={"description": "images newly flagged for referral by the new model"})
    started_at = fields.String(allow_none=True)
    finished_at = fields.String(allow_none=True)
    duration_s = fields.Float(allow_none=True)


class RescoreRunListSchema(Body):
    """The newest re-score runs that covered the clinic's images."""

    runs = fields.List(fields.Nested(RescoreRunSchema), required=True)


class ChangeSchema(Body):
    """An image whose class or referral flag a re-score changed."""

    image_id = fields.String()
    job_id = fields.String()
    filename = fields.String()
    change = fields.String(metadata={"description": "newly_flagged, no_longer_flagged or label_changed"})
    previous_model = fields.String(allow_none=True)
    previous_label = fields.String(allow_none=True)
    previous_malignancy = fields.Float(allow_none=True)
    previous_flagged = fields.Boolean(allow_none=True)
    new_model = fields.String()
    new_label = fields.String()
    new_malignancy = fields.Float()
    new_flagged = fields.Boolean()
    true_label = fields.String(allow_none=True)


class ChangeReportSchema(Body):
    """A re-score's change report for the clinic, newly flagged first."""

    run = fields.Nested(RescoreRunSchema, required=True)
    changes = fields.List(fields.Nested(ChangeSchema), required=True)
    next_cursor = fields.String(allow_none=True, metadata={
        "description": "pass as ?cursor= for the next page; null on the last page"})


# --- requests ---------------------------------------------------------------------------------------------------

class UploadSchema(Body):
    """A multipart upload of images (and optional ground truth)."""

    files = fields.List(fields.Raw(metadata=BINARY), required=True, metadata={
        "description": "JPEG, PNG, BMP or TIFF images, or .zip archives of them"})
    labels = fields.Raw(metadata={**BINARY, "description": "optional ground truth: HAM10000 metadata CSV or ISIC CSV"})
    finalize = fields.String(validate=OneOf(["true", "false"]), metadata={
        "description": "false keeps the job open for more parts (POST .../images)"})
    name = fields.String(metadata={
        "description": "optional batch name or reference, shown in the jobs list (up to 200 characters)"})
    batch_key = fields.String(metadata={
        "description": "optional client key of the batch (16-64 of A-Z a-z 0-9 - _): when the clinic has a job with "
                       "this key that can go on, the answer is that job (200, resumed) and nothing is stored"})
    part = fields.Integer(validate=Range(min=0, max=1_000_000), metadata={
        "description": "POST .../images: the part's number (the creating request is part 0); a part received "
                       "before answers 200 with duplicate_part and is not stored again"})


class JobListQuery(Body):
    """Paging of the job list."""

    page = fields.Integer(validate=Range(min=1, max=1_000_000))
    per_page = fields.Integer(validate=Range(min=1, max=200))
    batch_key = fields.String(metadata={"description": "only the job of this client batch key"})


class ResultsQuery(Body):
    """Format and paging of a job's results."""

    format = fields.String(validate=OneOf(["json", "csv"]), metadata={"description": "csv: every row, streamed"})
    limit = fields.Integer(validate=Range(min=1, max=10_000))
    offset = fields.Integer(validate=Range(min=0, max=100_000_000))
    history = fields.Boolean(metadata={"description": "every model version's prediction, not only the current"})


class RescoreRunsQuery(Body):
    """How many runs to list."""

    limit = fields.Integer(validate=Range(min=1, max=100))


class ChangesQuery(Body):
    """Which run's change report, in which format."""

    run = fields.Integer(validate=Range(min=1), metadata={
        "description": "run id (default: the clinic's newest finished run)"})
    format = fields.String(validate=OneOf(["json", "csv"]), metadata={"description": "csv: the whole report"})
    limit = fields.Integer(validate=Range(min=1, max=PAGE_MAX), metadata={"description": "changes per JSON page"})
    cursor = fields.String(metadata={"description": "next_cursor of the previous page (JSON)"})

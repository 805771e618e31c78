"""`skinscan check-storage` sorts every stored object: claimed by a row, unclaimed, the sweeper's, or not ours."""

from __future__ import annotations

from typing import Any

from fastweb import MODEL_VERSION, make_clinic

from skinscan.db import session_scope
from skinscan.storage import get_storage
from skinscan.storage_check import check_storage, report
from skinscan.tables import ImageRecord, Job, ModelVersion, Upload, new_id


def test_objects_are_sorted_and_only_unclaimed_ones_deleted(settings: Any) -> None:
    """An image's object and its heatmaps are claimed, as is a registered bundle; an image and a heatmap with no
    row, and a bundle with no version, are unclaimed and deleted with delete=True; objects under an upload intent
    are the sweeper's; keys not in SkinScan's layout are left alone; an image row without its object is missing."""
    storage = get_storage(settings)
    clinic_id, _ = make_clinic(settings)
    job_id, gone_job, upload = new_id(), new_id(), new_id()
    image_id, lost_id, no_row = new_id(), new_id(), new_id()
    claimed = f"{clinic_id}/{job_id}/{upload}/{image_id}.jpg"
    with session_scope(settings) as session:
        session.add(Job(id=job_id, clinic_id=clinic_id, status="done"))
        session.flush()
        session.add_all([
            ImageRecord(id=image_id, job_id=job_id, clinic_id=clinic_id, filename="a.jpg", storage_key=claimed),
            ImageRecord(id=lost_id, job_id=job_id, clinic_id=clinic_id, filename="b.jpg",
                        storage_key=f"{clinic_id}/{job_id}/{upload}/{lost_id}.jpg"),
            Upload(clinic_id=clinic_id, job_id=new_id(), prefix=f"{clinic_id}/{'e' * 32}/{upload}/"),
        ])
        session.get(ModelVersion, MODEL_VERSION).storage_prefix = "models/fast/abc/"
    keep = {claimed, f"{clinic_id}/{job_id}/gradcam/{image_id}-0123456789abcdef.png",
            f"{clinic_id}/{job_id}/gradcam/{image_id}-0123456789abcdef.state.json", "models/fast/abc/weights.pt"}
    unclaimed = {f"{clinic_id}/{job_id}/{upload}/{no_row}.jpg", f"{clinic_id}/{gone_job}/{upload}/{no_row}.png",
                 f"{clinic_id}/{job_id}/gradcam/{no_row}-0123456789abcdef.png", "models/later/def/weights.pt"}
    swept = {f"{clinic_id}/{'e' * 32}/{upload}/{no_row}.jpg"}
    foreign = {"notes/readme.txt"}
    for key in keep | unclaimed | swept | foreign:
        storage.put(key, b"x")

    found = check_storage(settings, storage)
    assert (found.objects, found.claimed, set(found.unclaimed), found.swept_later, set(found.foreign)) == (
        10, 4, unclaimed, 1, foreign)
    assert dict(found.missing) == {job_id: 1} and not found.consistent and found.deleted == 0
    assert "4 claimed by nothing (run again with --delete" in report(found)
    assert f"  {job_id}  1 images missing" in report(found)

    done = check_storage(settings, storage, delete=True)
    assert done.deleted == 4 and not done.consistent  # the missing image still needs its job deleted again
    assert set(storage.list_keys("")) >= keep | swept | foreign
    assert not set(storage.list_keys("")) & unclaimed
    with session_scope(settings) as session:
        session.delete(session.get(ImageRecord, lost_id))
    assert check_storage(settings, storage).consistent

"""Ground-truth CSV parsing: every format it accepts, and errors that name the line that is wrong."""

from __future__ import annotations

import pytest

from skinscan.labels import CLASSES, LabelFileError, parse_ground_truth

HAM = "lesion_id,image_id,dx,dx_type,age,sex,localization\n"
ISIC2017 = "image_id,melanoma,seborrheic_keratosis\n"
ISIC2019 = "image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK\n"


def test_valid_files() -> None:
    ham = parse_ground_truth("\ufeff" + HAM + "HAM_1,ISIC_1,mel,histo,55.0,male,back\n\n"
                             "HAM_2,ISIC_2,NV,follow_up,30.0,female,face\n")
    assert ham.format == "ham10000" and ham.known_labels == CLASSES
    assert ham.labels == {"ISIC_1": "mel", "ISIC_2": "nv"}
    assert ham.extra["ISIC_1"]["localization"] == "back" and ham.extra["ISIC_1"]["lesion_id"] == "HAM_1"

    isic = parse_ground_truth(ISIC2017 + "ISIC_1,1.0,0.0\nISIC_2,0.0,1.0\nISIC_3,0,0\n")
    assert isic.format == "isic2017" and set(isic.known_labels) == {"mel", "bkl", "nv"}
    assert isic.labels == {"ISIC_1": "mel", "ISIC_2": "bkl", "ISIC_3": "nv"}

    onehot = parse_ground_truth(ISIC2019 + "ISIC_1,0,0,0,0,0,0,0,1,0\nISIC_2,0,0,0,0,0,0,0,0,1\n"
                                "ISIC_3,0,0,0,1,0,0,0,0,0\n")
    assert onehot.format == "isic_onehot"
    assert onehot.labels == {"ISIC_1": "akiec", "ISIC_3": "akiec"}  # SCC and AK -> akiec; UNK unlabelled


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("image_id,diagnosis\nISIC_1,mel\n", 1, "unrecognised columns"),
        ("image,MEL,NV,FOO\nISIC_1,1,0,0\n", 1, "unrecognised columns"),
        ("", 1, "empty"),
        (HAM + "HAM_1,ISIC_1,mel,histo,55,male,back\nHAM_2,ISIC_2,melanoma,histo,50,male,back\n", 3,
         "unknown diagnosis 'melanoma'"),
        (HAM + "HAM_1,ISIC_1,mel,histo,55,male\n", 2, "expected 7 columns, found 6"),
        (ISIC2017 + "ISIC_1,0,0\nISIC_2,0,0\nISIC_3,yes,0\n", 4, "'melanoma' must be 0 or 1, got 'yes'"),
        (ISIC2017 + "ISIC_1,0,0.5\n", 2, "column 'seborrheic_keratosis' must be 0 or 1"),
        (ISIC2017 + "ISIC_1,1,0\nISIC_2,1,1\n", 3, "cannot both be 1"),
        (ISIC2019 + "ISIC_1,1,0,0,0,0,0,0,0,0\nISIC_2,1,1,0,0,0,0,0,0,0\n", 3, "exactly one class column"),
        (ISIC2019 + "ISIC_1,0,0,0,0,0,0,0,0,0\n", 2, "exactly one class column must be 1, found 0"),
        (ISIC2017 + ",1,0\n", 2, "empty image id"),
        (ISIC2017, 2, "no labelled rows"),
        (ISIC2019 + "ISIC_1,0,0,0,0,0,0,0,0,1\n", 2, "no labelled rows"),
    ],
)
def test_errors_carry_line_numbers(text: str, line: int, message: str) -> None:
    with pytest.raises(LabelFileError, match=message) as info:
        parse_ground_truth(text)
    assert info.value.line == line
    assert str(info.value).startswith(f"line {line}: ")


@pytest.mark.parametrize(
    ("text", "line"),
    [
        (HAM + "HAM_1,ISIC_1,mel,histo,55,male,back\nHAM_2,ISIC_2,nv,histo,5,male,back\n"
               "HAM_1,ISIC_1,mel,histo,55,male,back\n", 4),
        (ISIC2017 + "ISIC_7,0,0\nISIC_7,1,0\n", 3),
        (ISIC2019 + "ISIC_1,1,0,0,0,0,0,0,0,0\n\nISIC_1,1,0,0,0,0,0,0,0,0\n", 4),
    ],
)
def test_duplicate_ids(text: str, line: int) -> None:
    with pytest.raises(LabelFileError, match="listed twice") as info:
        parse_ground_truth(text)
    assert info.value.line == line

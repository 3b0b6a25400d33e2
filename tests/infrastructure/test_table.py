"""The job table matches what the job store creates and queries (kiln.store.table_definition)."""

from __future__ import annotations

from kiln.store import table_definition

from .conftest import Synthesized


def test_table_keys_and_indexes_equal_the_job_store_definition(synth: Synthesized) -> None:
    # GIVEN the synthesized table and the job store's own definition
    _, table = synth.one("AWS::DynamoDB::Table")
    props = table["Properties"]
    expected = table_definition("ignored")

    def by_name(items: list[dict[str, object]], key: str) -> dict[object, dict[str, object]]:
        return {item[key]: item for item in items}

    # THEN keys, attribute types, indexes (keys and projection) and billing mode are the same
    assert props["KeySchema"] == expected["KeySchema"]
    assert by_name(props["AttributeDefinitions"], "AttributeName") == by_name(
        expected["AttributeDefinitions"], "AttributeName")
    assert by_name(props["GlobalSecondaryIndexes"], "IndexName") == by_name(
        expected["GlobalSecondaryIndexes"], "IndexName")
    assert props["BillingMode"] == expected["BillingMode"]


def test_table_is_encrypted_recoverable_and_protected(synth: Synthesized) -> None:
    # GIVEN the synthesized table
    _, table = synth.one("AWS::DynamoDB::Table")
    props = table["Properties"]
    key, _ = synth.one("AWS::KMS::Key")
    # THEN it uses Kiln's key, has point-in-time recovery, deletion protection, and is retained on stack delete
    assert props["SSESpecification"] == {"KMSMasterKeyId": {"Fn::GetAtt": [key, "Arn"]}, "SSEEnabled": True,
                                         "SSEType": "KMS"}
    assert props["PointInTimeRecoverySpecification"]["PointInTimeRecoveryEnabled"] is True
    assert props["DeletionProtectionEnabled"] is True
    assert table["DeletionPolicy"] == "Retain"


def test_key_rotates(synth: Synthesized) -> None:
    # GIVEN Kiln's KMS key
    _, key = synth.one("AWS::KMS::Key")
    # THEN automatic rotation is on
    assert key["Properties"]["EnableKeyRotation"] is True

#!/usr/bin/env python3
"""A cron-style key sync written the obvious way on Huawei's official Python SDK.

The benchmark (`cargo run --release --example bench`) runs it beside kps-sync, against the same
fake KPS with the same latency, as the baseline an operator would otherwise write:
list the key pairs (all pages), batch-export the wanted names ten at a time, unzip each answer,
and write every key atomically with mode 0600.

usage: sdk-sync.py NAMES_FILE DEST_DIR      (NAMES_FILE: one key pair name a line)
environment: URL (the KPS endpoint), AK, SK, PROJECT_ID

Needs `pip install huaweicloudsdkkps` (3.1.219 was used) in a virtualenv.
"""
import io
import os
import sys
import tempfile
import zipfile

from huaweicloudsdkcore.auth.credentials import BasicCredentials
from huaweicloudsdkcore.http.http_config import HttpConfig
from huaweicloudsdkkps.v3 import (
    BatchExportPrivateKeyRequest,
    ExportPrivateKeyKeypairBean,
    ExportPrivateKeyRequestBody,
    KpsClient,
    ListKeypairsRequest,
)


def client():
    cred = BasicCredentials(os.environ["AK"], os.environ["SK"], os.environ["PROJECT_ID"])
    return (
        KpsClient.new_builder()
        .with_http_config(HttpConfig.get_default_config())
        .with_credentials(cred)
        .with_endpoints([os.environ["URL"]])
        .build()
    )


def listed(kps):
    names, marker = set(), None
    while True:
        page = kps.list_keypairs(ListKeypairsRequest(limit="50", marker=marker))
        names.update(k.keypair.name for k in page.keypairs or [])
        marker = getattr(page.page_info, "next_marker", None) if page.page_info else None
        if not marker:
            return names


def write_atomic(path, data):
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".sdk-sync-")
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def main():
    names_file, dest = sys.argv[1], sys.argv[2]
    wanted = [n.strip() for n in open(names_file) if n.strip()]
    kps = client()
    present = listed(kps)
    todo = [n for n in wanted if n in present]
    os.makedirs(dest, mode=0o700, exist_ok=True)
    for i in range(0, len(todo), 10):
        batch = todo[i : i + 10]
        body = [ExportPrivateKeyRequestBody(keypair=ExportPrivateKeyKeypairBean(name=n)) for n in batch]
        answer = kps.batch_export_private_key(BatchExportPrivateKeyRequest(body=body))
        with zipfile.ZipFile(io.BytesIO(answer.raw_content)) as z:
            for entry in z.namelist():
                name = os.path.splitext(os.path.basename(entry))[0]
                if name in batch:
                    write_atomic(os.path.join(dest, name + ".pem"), z.read(entry))
    print(f"wrote {len(todo)} keys", file=sys.stderr)


if __name__ == "__main__":
    main()

//! Write-ahead log round trips and recovery from torn and corrupt records.

mod common;

use std::fs::{self, OpenOptions};
use std::path::Path;

use index_svc::error::WalError;
use index_svc::wal::{Wal, WalRecord, WalRecovery, WAL_FILE_NAME};

fn records() -> Vec<WalRecord> {
    vec![
        WalRecord::Upsert {
            sequence: 1,
            model_fingerprint: "model-a".into(),
            dimension: 3,
            items: vec![
                common::item("a", vec![1.0, 2.0, 3.0]),
                common::item("b", vec![-1.0, 0.0, 0.5]),
            ],
        },
        WalRecord::Delete {
            sequence: 2,
            ids: vec!["a".into()],
        },
        WalRecord::Upsert {
            sequence: 3,
            model_fingerprint: String::new(),
            dimension: 3,
            items: vec![common::item("c", vec![0.25, 0.5, 0.75])],
        },
    ]
}

/// Writes `records` to a new log and returns the file length after each one.
fn write_log(path: &Path, records: &[WalRecord]) -> Vec<u64> {
    let (mut wal, recovery) = Wal::open(path, true, |_| Ok::<(), String>(())).unwrap();
    assert_eq!(recovery, WalRecovery::default());
    records
        .iter()
        .map(|record| {
            wal.append(record).unwrap();
            wal.len_bytes()
        })
        .collect()
}

fn read_log(path: &Path) -> Result<(Vec<WalRecord>, WalRecovery, Wal), WalError> {
    let mut read = Vec::new();
    let (wal, recovery) = Wal::open(path, true, |record| {
        read.push(record);
        Ok::<(), String>(())
    })?;
    Ok((read, recovery, wal))
}

fn flip_byte(path: &Path, offset: u64) {
    let mut bytes = fs::read(path).unwrap();
    bytes[offset as usize] ^= 0x5A;
    fs::write(path, bytes).unwrap();
}

#[test]
fn wal_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(WAL_FILE_NAME);
    let ends = write_log(&path, &records());

    let (read, recovery, wal) = read_log(&path).unwrap();

    assert_eq!(read, records());
    assert_eq!(recovery.records, 3);
    assert_eq!(recovery.discarded_bytes, 0);
    assert_eq!(recovery.discard_reason, None);
    assert_eq!(wal.records(), 3);
    assert_eq!(wal.len_bytes(), ends[2]);
    assert_eq!(fs::metadata(&path).unwrap().len(), ends[2]);
}

#[test]
fn torn_final_record_is_discarded() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(WAL_FILE_NAME);
    let ends = write_log(&path, &records());
    let cut = ends[2] - 5;
    OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(cut)
        .unwrap();

    let (read, recovery, mut wal) = read_log(&path).unwrap();

    assert_eq!(read, records()[..2].to_vec());
    assert_eq!(recovery.discarded_bytes, cut - ends[1]);
    let reason = recovery.discard_reason.expect("a discard reason");
    assert!(reason.contains("runs past the end of the file"), "{reason}");
    assert_eq!(fs::metadata(&path).unwrap().len(), ends[1]);

    // Appends continue after the last complete record.
    let replacement = WalRecord::Delete {
        sequence: 3,
        ids: vec!["b".into()],
    };
    wal.append(&replacement).unwrap();
    drop(wal);
    let (read, recovery, _) = read_log(&path).unwrap();
    assert_eq!(read.len(), 3);
    assert_eq!(read[2], replacement);
    assert_eq!(recovery.discarded_bytes, 0);
}

#[test]
fn torn_frame_header_is_discarded() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(WAL_FILE_NAME);
    let ends = write_log(&path, &records());
    OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(ends[1] + 3)
        .unwrap();

    let (read, recovery, _) = read_log(&path).unwrap();

    assert_eq!(read, records()[..2].to_vec());
    assert_eq!(recovery.discarded_bytes, 3);
    assert!(recovery
        .discard_reason
        .unwrap()
        .contains("incomplete record header"));
    assert_eq!(fs::metadata(&path).unwrap().len(), ends[1]);
}

#[test]
fn corrupt_final_checksum_is_discarded() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(WAL_FILE_NAME);
    let ends = write_log(&path, &records());
    flip_byte(&path, ends[2] - 2);

    let (read, recovery, wal) = read_log(&path).unwrap();

    assert_eq!(read, records()[..2].to_vec());
    assert_eq!(recovery.discarded_bytes, ends[2] - ends[1]);
    assert!(recovery.discard_reason.unwrap().contains("checksum"));
    assert_eq!(wal.records(), 2);
    assert_eq!(fs::metadata(&path).unwrap().len(), ends[1]);
}

#[test]
fn corrupt_length_of_final_record_is_discarded() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(WAL_FILE_NAME);
    let ends = write_log(&path, &records());
    // The most significant byte of the final record's length field.
    flip_byte(&path, ends[1] + 3);

    let (read, recovery, _) = read_log(&path).unwrap();

    assert_eq!(read, records()[..2].to_vec());
    assert_eq!(recovery.discarded_bytes, ends[2] - ends[1]);
}

#[test]
fn corrupt_middle_record_fails_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(WAL_FILE_NAME);
    let ends = write_log(&path, &records());
    let size_before = fs::metadata(&path).unwrap().len();
    flip_byte(&path, ends[0] - 1);

    let error = read_log(&path).unwrap_err();

    let WalError::Corrupt { offset, .. } = &error else {
        panic!("expected a corruption error, got {error}");
    };
    assert_eq!(
        *offset, 12,
        "the first record starts after the 12-byte header"
    );
    assert!(error.to_string().contains("more records follow"), "{error}");
    assert_eq!(
        fs::metadata(&path).unwrap().len(),
        size_before,
        "a refused log is left untouched"
    );
}

#[test]
fn foreign_file_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(WAL_FILE_NAME);
    fs::write(&path, b"this is not a write-ahead log").unwrap();

    let error = read_log(&path).unwrap_err();

    assert!(matches!(error, WalError::BadMagic { .. }), "{error}");
}

#[test]
fn reset_empties_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(WAL_FILE_NAME);
    write_log(&path, &records());
    let (_, _, mut wal) = read_log(&path).unwrap();

    wal.reset().unwrap();
    drop(wal);

    let (read, recovery, wal) = read_log(&path).unwrap();
    assert!(read.is_empty());
    assert_eq!(recovery.records, 0);
    assert_eq!(wal.len_bytes(), 12);
}

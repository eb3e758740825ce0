//! Reader, tint and catalog checks against the Fashion-MNIST files on disk.

use std::io::Write;
use std::path::Path;
use std::sync::OnceLock;

use densebert4ret_datasets::{
    catalog_items, colour_of, default_data_dir, item_id, parse_item_id, png_bytes, tint,
    tinted_image, CatalogItem, Colour, DatasetError, FashionClass, FashionMnist, Split, SplitData,
    IMAGE_PIXELS,
};
use flate2::write::GzEncoder;
use flate2::Compression;

fn data() -> &'static FashionMnist {
    static DATA: OnceLock<FashionMnist> = OnceLock::new();
    DATA.get_or_init(|| {
        FashionMnist::load_default().expect(
            "Fashion-MNIST files under DB4R_FASHION_MNIST_DIR or /usr/share/datasets/fashion-mnist",
        )
    })
}

#[test]
fn reader_loads_all_seventy_thousand_images() {
    let data = data();
    assert_eq!(data.train.len(), 60_000);
    assert_eq!(data.test.len(), 10_000);
    assert_eq!(data.train.len() + data.test.len(), 70_000);
    assert_eq!(data.test.pixels(9_999).unwrap().len(), IMAGE_PIXELS);
}

#[test]
fn reader_labels_cover_ten_balanced_classes() {
    // Fashion-MNIST has 6,000 training and 1,000 test images per class.
    for (split, per_class) in [(Split::Train, 6_000), (Split::Test, 1_000)] {
        let labels = data().split(split).labels();
        for class in FashionClass::ALL {
            let count = labels.iter().filter(|&&label| label == class).count();
            assert_eq!(count, per_class, "{split} count of {class}");
        }
        let max_label = labels.iter().map(|class| class.label()).max().unwrap();
        assert_eq!(max_label, 9);
    }
}

#[test]
fn reader_images_are_not_blank() {
    let pixels = data().train.pixels(0).unwrap();
    assert!(
        pixels.iter().any(|&grey| grey > 200),
        "first training image has no bright pixel"
    );
    assert!(
        pixels.contains(&0),
        "first training image has no background"
    );
}

#[test]
fn out_of_range_index_is_rejected() {
    let error = data().test.pixels(10_000).unwrap_err();
    assert!(
        matches!(
            error,
            DatasetError::IndexOutOfRange {
                index: 10_000,
                len: 10_000,
                ..
            }
        ),
        "{error}"
    );
}

fn write_gz(path: &Path, bytes: &[u8]) {
    let mut encoder = GzEncoder::new(std::fs::File::create(path).unwrap(), Compression::fast());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap();
}

fn idx_bytes(magic: u32, dims: &[u32], payload: &[u8]) -> Vec<u8> {
    let mut bytes = magic.to_be_bytes().to_vec();
    for dim in dims {
        bytes.extend_from_slice(&dim.to_be_bytes());
    }
    bytes.extend_from_slice(payload);
    bytes
}

#[test]
fn reader_accepts_small_valid_files() {
    let dir = tempfile::tempdir().unwrap();
    write_gz(
        &Split::Test.images_path(dir.path()),
        &idx_bytes(0x803, &[2, 28, 28], &[7; 2 * IMAGE_PIXELS]),
    );
    write_gz(
        &Split::Test.labels_path(dir.path()),
        &idx_bytes(0x801, &[2], &[9, 0]),
    );
    let split = SplitData::load(dir.path(), Split::Test).unwrap();
    assert_eq!(
        split.labels(),
        &[FashionClass::AnkleBoot, FashionClass::TShirt]
    );
    assert_eq!(split.pixels(1).unwrap()[0], 7);
}

#[test]
fn reader_rejects_wrong_magic() {
    let dir = tempfile::tempdir().unwrap();
    // A label file where the image file should be.
    write_gz(
        &Split::Test.images_path(dir.path()),
        &idx_bytes(0x801, &[1], &[0]),
    );
    write_gz(
        &Split::Test.labels_path(dir.path()),
        &idx_bytes(0x801, &[1], &[0]),
    );
    let error = SplitData::load(dir.path(), Split::Test).unwrap_err();
    assert!(
        matches!(
            error,
            DatasetError::InvalidMagic {
                found: 0x801,
                expected: 0x803,
                ..
            }
        ),
        "{error}"
    );
}

#[test]
fn reader_rejects_truncated_payload() {
    let dir = tempfile::tempdir().unwrap();
    write_gz(
        &Split::Test.images_path(dir.path()),
        &idx_bytes(0x803, &[2, 28, 28], &[0; IMAGE_PIXELS]),
    );
    write_gz(
        &Split::Test.labels_path(dir.path()),
        &idx_bytes(0x801, &[2], &[0, 1]),
    );
    let error = SplitData::load(dir.path(), Split::Test).unwrap_err();
    assert!(
        matches!(
            error,
            DatasetError::SizeMismatch {
                expected: 1568,
                actual: 784,
                ..
            }
        ),
        "{error}"
    );
}

#[test]
fn reader_rejects_wrong_image_size() {
    let dir = tempfile::tempdir().unwrap();
    write_gz(
        &Split::Test.images_path(dir.path()),
        &idx_bytes(0x803, &[1, 32, 32], &[0; 32 * 32]),
    );
    let error = SplitData::load(dir.path(), Split::Test).unwrap_err();
    assert!(
        matches!(
            error,
            DatasetError::InvalidImageSize {
                rows: 32,
                cols: 32,
                ..
            }
        ),
        "{error}"
    );
}

#[test]
fn reader_rejects_label_above_nine() {
    let dir = tempfile::tempdir().unwrap();
    write_gz(
        &Split::Test.images_path(dir.path()),
        &idx_bytes(0x803, &[2, 28, 28], &[0; 2 * IMAGE_PIXELS]),
    );
    write_gz(
        &Split::Test.labels_path(dir.path()),
        &idx_bytes(0x801, &[2], &[3, 10]),
    );
    let error = SplitData::load(dir.path(), Split::Test).unwrap_err();
    assert!(
        matches!(
            error,
            DatasetError::LabelOutOfRange {
                index: 1,
                label: 10,
                ..
            }
        ),
        "{error}"
    );
}

#[test]
fn reader_rejects_count_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    write_gz(
        &Split::Test.images_path(dir.path()),
        &idx_bytes(0x803, &[2, 28, 28], &[0; 2 * IMAGE_PIXELS]),
    );
    write_gz(
        &Split::Test.labels_path(dir.path()),
        &idx_bytes(0x801, &[3], &[0, 1, 2]),
    );
    let error = SplitData::load(dir.path(), Split::Test).unwrap_err();
    assert!(
        matches!(
            error,
            DatasetError::CountMismatch {
                images: 2,
                labels: 3,
                ..
            }
        ),
        "{error}"
    );
}

#[test]
fn missing_directory_error_names_path() {
    let error = SplitData::load(Path::new("/nonexistent/fashion-mnist"), Split::Train).unwrap_err();
    let message = error.to_string();
    assert!(
        message.contains("/nonexistent/fashion-mnist/train-images-idx3-ubyte.gz"),
        "{message}"
    );
    assert!(message.contains("DB4R_FASHION_MNIST_DIR"), "{message}");
}

#[test]
fn default_dir_is_the_system_dataset() {
    if std::env::var_os("DB4R_FASHION_MNIST_DIR").is_none() {
        assert_eq!(
            default_data_dir(),
            Path::new("/usr/share/datasets/fashion-mnist")
        );
    }
}

#[test]
fn colour_is_deterministic_and_not_index_modulo() {
    let first: Vec<Colour> = (0..1_000)
        .map(|index| colour_of(Split::Test, index))
        .collect();
    let second: Vec<Colour> = (0..1_000)
        .map(|index| colour_of(Split::Test, index))
        .collect();
    assert_eq!(first, second);

    let modulo_matches = first
        .iter()
        .enumerate()
        .filter(|&(index, &colour)| colour == Colour::ALL[index % 8])
        .count();
    assert!(
        modulo_matches < 250,
        "{modulo_matches} of 1000 colours equal index % 8"
    );

    let train: Vec<Colour> = (0..1_000)
        .map(|index| colour_of(Split::Train, index))
        .collect();
    assert_ne!(
        first, train,
        "train and test splits share the colour sequence"
    );
}

#[test]
fn colours_are_balanced_in_each_split() {
    for (split, len) in [(Split::Train, 60_000usize), (Split::Test, 10_000)] {
        let mut counts = [0usize; 8];
        for index in 0..len {
            let colour = colour_of(split, index);
            counts[Colour::ALL
                .iter()
                .position(|&other| other == colour)
                .unwrap()] += 1;
        }
        // A uniform hash gives binomial counts: allow four standard deviations.
        let expected = len as f64 / 8.0;
        let tolerance = 4.0 * (expected * 7.0 / 8.0).sqrt();
        for (colour, count) in Colour::ALL.iter().zip(counts) {
            let deviation = (count as f64 - expected).abs();
            assert!(
                deviation < tolerance,
                "{split}: {count} {colour} images, expected {expected} +- {tolerance:.0}"
            );
        }
    }
}

#[test]
fn tint_scales_grey_by_colour() {
    let mut pixels = vec![0u8; IMAGE_PIXELS];
    pixels[1] = 255;
    pixels[2] = 128;
    let image = tint(&pixels, Colour::Orange).unwrap();
    assert_eq!(image.dimensions(), (28, 28));
    assert_eq!(image.get_pixel(0, 0).0, [0, 0, 0]);
    assert_eq!(image.get_pixel(1, 0).0, [255, 140, 0]);
    // 128 * 255 / 255 = 128 and 128 * 140 / 255 = 70.27, rounded down.
    assert_eq!(image.get_pixel(2, 0).0, [128, 70, 0]);
}

#[test]
fn tint_rejects_wrong_pixel_count() {
    let error = tint(&[0; 10], Colour::Red).unwrap_err();
    assert!(error.to_string().contains("784"), "{error}");
}

#[test]
fn tinted_image_uses_index_colour() {
    let data = &data().test;
    for index in [0, 42, 9_999] {
        let colour = colour_of(Split::Test, index);
        let image = tinted_image(data, index).unwrap();
        let grey = data.pixels(index).unwrap();
        let brightest = (0..IMAGE_PIXELS).max_by_key(|&pixel| grey[pixel]).unwrap();
        let pixel = image
            .get_pixel((brightest % 28) as u32, (brightest / 28) as u32)
            .0;
        let expected = colour
            .rgb()
            .map(|channel| (u16::from(grey[brightest]) * u16::from(channel) / 255) as u8);
        assert_eq!(pixel, expected, "index {index} tinted {colour}");
    }
}

#[test]
fn png_bytes_round_trip() {
    let image = tinted_image(&data().test, 7).unwrap();
    let bytes = png_bytes(&image).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    let decoded = image::load_from_memory(&bytes).unwrap().to_rgb8();
    assert_eq!(decoded, image);
}

#[test]
fn catalog_items_carry_id_and_metadata() {
    let items = catalog_items(&data().test);
    assert_eq!(items.len(), 10_000);
    let item = &items[42];
    assert_eq!(item.id, "fmnist-test-00042");
    let metadata = item.metadata();
    assert_eq!(metadata["split"], "test");
    assert_eq!(metadata["index"], "42");
    assert_eq!(metadata["class"], data().test.class(42).unwrap().name());
    assert_eq!(metadata["colour"], colour_of(Split::Test, 42).name());
    assert_eq!(metadata.len(), 4);
    assert_eq!(CatalogItem::new(&data().test, 42).unwrap(), *item);
}

#[test]
fn item_id_round_trips() {
    assert_eq!(item_id(Split::Train, 59_999), "fmnist-train-59999");
    assert_eq!(
        parse_item_id("fmnist-train-59999").unwrap(),
        (Split::Train, 59_999)
    );
    assert_eq!(
        parse_item_id("fmnist-test-00042").unwrap(),
        (Split::Test, 42)
    );
}

#[test]
fn malformed_item_ids_are_rejected() {
    for id in [
        "",
        "fmnist-test-",
        "fmnist-val-00001",
        "mnist-test-00001",
        "fmnist-test-+1",
        "fmnist-test-1a",
        "fmnist-test",
    ] {
        let error = parse_item_id(id).unwrap_err();
        assert!(
            matches!(error, DatasetError::InvalidItemId { .. }),
            "{id:?}: {error}"
        );
    }
}

#[test]
fn class_and_colour_names_parse_back() {
    for class in FashionClass::ALL {
        assert_eq!(class.name().parse::<FashionClass>().unwrap(), class);
        assert_eq!(FashionClass::from_label(class.label()), Some(class));
    }
    for colour in Colour::ALL {
        assert_eq!(colour.name().parse::<Colour>().unwrap(), colour);
        assert_eq!(Colour::ALL[colour.index()], colour);
    }
    let error = "magenta".parse::<Colour>().unwrap_err();
    assert!(error.to_string().contains("red, orange"), "{error}");
    assert_eq!(FashionClass::AnkleBoot.with_article(), "an ankle boot");
    assert_eq!(FashionClass::Trousers.with_article(), "a pair of trousers");
}

#[test]
fn reader_rejects_truncated_header() {
    let dir = tempfile::tempdir().unwrap();
    write_gz(&Split::Test.images_path(dir.path()), &[0, 0, 8]);
    let error = SplitData::load(dir.path(), Split::Test).unwrap_err();
    assert!(
        matches!(
            error,
            DatasetError::TruncatedHeader {
                expected: 4,
                actual: 3,
                ..
            }
        ),
        "{error}"
    );

    write_gz(
        &Split::Test.images_path(dir.path()),
        &idx_bytes(0x803, &[1, 28], &[]),
    );
    let error = SplitData::load(dir.path(), Split::Test).unwrap_err();
    assert!(
        matches!(
            error,
            DatasetError::TruncatedHeader {
                expected: 16,
                actual: 12,
                ..
            }
        ),
        "{error}"
    );
}

//! easy-VQA shapes checks: attribute recovery on the data of the installed
//! easy-vqa 1.0 package and on fixture files in the same layout, and query
//! generation.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::OnceLock;

use common::{save, write};
use densebert4ret_datasets::easyvqa::{
    all_shape_texts, attributes_from_pixels, default_shape_test_queries,
    default_two_step_shape_test_queries, easyvqa_item_id, generate_shape_queries,
    generate_two_step_shape_queries, parse_easyvqa_item_id, render_shape_template, shape_templates,
    AnnotationSource, EasyVqa, EasyVqaSplit, Shape, ShapeColour, ShapeIndex, ShapeQuery,
    EASY_VQA_TEST_QUERY_COUNT, EASY_VQA_TWO_STEP_TEST_QUERY_COUNT,
};
use densebert4ret_datasets::{
    load_rgb_file, DatasetError, DatasetSpec, LoadOptions, Phrasing, QueryConfig, QueryKind,
    RetrievalBenchmark, Split, STEP_SEPARATOR,
};
use image::{Rgb, RgbImage};

fn data() -> &'static EasyVqa {
    static DATA: OnceLock<EasyVqa> = OnceLock::new();
    DATA.get_or_init(|| {
        EasyVqa::load_default().expect(
            "easy-VQA data of the easy-vqa==1.0 package: run scripts/setup.sh or set DB4R_EASY_VQA_DIR",
        )
    })
}

/// Draws a 64x64 image with a light background and one filled shape.
fn draw(shape: Shape, colour: ShapeColour) -> RgbImage {
    let mut image = RgbImage::from_pixel(64, 64, Rgb([240, 236, 228]));
    for y in 0..64_u32 {
        for x in 0..64_u32 {
            let (dx, dy) = (x as f64 - 32.0, y as f64 - 32.0);
            let inside = match shape {
                Shape::Rectangle => (12..44).contains(&x) && (16..40).contains(&y),
                Shape::Circle => dx * dx + dy * dy <= 18.0 * 18.0,
                // Apex at the top centre, base along y = 50.
                Shape::Triangle => (14..=50).contains(&y) && dx.abs() <= (y as f64 - 14.0) / 2.0,
            };
            if inside {
                image.put_pixel(x, y, Rgb(colour.rgb()));
            }
        }
    }
    image
}

/// Writes a split folder with the given images and questions.json entries.
fn write_split(root: &Path, split: &str, images: &[RgbImage], questions: &str) {
    for (index, image) in images.iter().enumerate() {
        save(
            &root.join(split).join("images").join(format!("{index}.png")),
            image,
        );
    }
    write(&root.join(split).join("questions.json"), questions);
}

#[test]
fn package_data_loads_every_image() {
    let data = data();
    assert_eq!(data.train.len(), 4_000);
    assert_eq!(data.test.len(), 1_000);
    for split in [&data.train, &data.test] {
        let shapes: BTreeSet<Shape> = split.images().iter().map(|image| image.shape).collect();
        let colours: BTreeSet<ShapeColour> =
            split.images().iter().map(|image| image.colour).collect();
        assert_eq!(shapes.len(), 3, "{} shapes", split.split());
        assert_eq!(colours.len(), 8, "{} colours", split.split());
    }
    let test_index = ShapeIndex::full(&data.test);
    for shape in Shape::ALL {
        for colour in ShapeColour::ALL {
            assert!(
                test_index.items(shape, colour).len() >= 10,
                "only {} test images are {colour} {shape}s",
                test_index.items(shape, colour).len()
            );
        }
    }
}

#[test]
fn questions_settle_most_attributes() {
    let data = data();
    let images = data.train.images();
    let from_questions =
        |select: fn(&densebert4ret_datasets::easyvqa::EasyVqaImage) -> AnnotationSource| {
            images
                .iter()
                .filter(|image| select(image) == AnnotationSource::Questions)
                .count()
        };
    // easy-vqa 1.0 has at least one shape and one colour question about
    // almost every image. Yes/no questions that rule out two of three shapes
    // also settle the shape.
    assert!(from_questions(|image| image.shape_from) > 3_600);
    assert!(from_questions(|image| image.colour_from) > 3_400);
    let from_pixels = images
        .iter()
        .filter(|image| {
            image.shape_from == AnnotationSource::Pixels
                || image.colour_from == AnnotationSource::Pixels
        })
        .count();
    assert!(from_pixels > 0, "some images need the pixel fallback");
}

#[test]
fn pixels_agree_with_question_answers() {
    let data = data();
    let mut checked = 0;
    for split in [&data.train, &data.test] {
        for image in split.images() {
            let pixels = load_rgb_file(&split.image_path(image.index)).unwrap();
            let (shape, colour) = attributes_from_pixels(&pixels).unwrap();
            if image.shape_from == AnnotationSource::Questions {
                assert_eq!(
                    shape,
                    image.shape,
                    "{} image {}",
                    split.split(),
                    image.index
                );
                checked += 1;
            }
            if image.colour_from == AnnotationSource::Questions {
                assert_eq!(
                    colour,
                    image.colour,
                    "{} image {}",
                    split.split(),
                    image.index
                );
                checked += 1;
            }
        }
    }
    assert!(checked > 8_000, "only {checked} attributes compared");
}

#[test]
fn pixels_recover_drawn_shapes() {
    for shape in Shape::ALL {
        for colour in ShapeColour::ALL {
            let recovered = attributes_from_pixels(&draw(shape, colour)).unwrap();
            assert_eq!(recovered, (shape, colour));
        }
    }
    let blank = RgbImage::from_pixel(64, 64, Rgb([240, 236, 228]));
    let error = attributes_from_pixels(&blank).unwrap_err();
    assert!(error.to_string().contains("no pixel"), "{error}");
}

#[test]
fn fixture_answers_and_pixels_combine() {
    let dir = tempfile::tempdir().unwrap();
    let images = [
        draw(Shape::Circle, ShapeColour::Teal),
        draw(Shape::Triangle, ShapeColour::Brown),
        draw(Shape::Rectangle, ShapeColour::Gray),
    ];
    // Image 0 has open questions. Image 1 has negated yes/no questions that
    // rule out the circle and the rectangle, and no colour question. Image 2
    // has no question at all.
    let questions = r#"[
        ["what shape is in the image?", "circle", 0],
        ["what color is the shape?", "teal", 0],
        ["is there not a circle?", "yes", 1],
        ["does the image not contain a rectangle?", "yes", 1],
        ["is there a red shape?", "no", 1]
    ]"#;
    write_split(dir.path(), "test", &images, questions);
    let split = EasyVqaSplit::load(dir.path(), Split::Test).unwrap();
    let found: Vec<(Shape, ShapeColour, AnnotationSource, AnnotationSource)> = split
        .images()
        .iter()
        .map(|image| {
            (
                image.shape,
                image.colour,
                image.shape_from,
                image.colour_from,
            )
        })
        .collect();
    use AnnotationSource::{Pixels, Questions};
    assert_eq!(
        found,
        vec![
            (Shape::Circle, ShapeColour::Teal, Questions, Questions),
            (Shape::Triangle, ShapeColour::Brown, Questions, Pixels),
            (Shape::Rectangle, ShapeColour::Gray, Pixels, Pixels),
        ]
    );
}

#[test]
fn yes_no_answers_respect_negation() {
    let dir = tempfile::tempdir().unwrap();
    let images = [
        draw(Shape::Rectangle, ShapeColour::Red),
        draw(Shape::Circle, ShapeColour::Blue),
    ];
    let questions = r#"[
        ["is no rectangle present?", "no", 0],
        ["is there not a red shape in the image?", "no", 0],
        ["what is the blue shape?", "circle", 1]
    ]"#;
    write_split(dir.path(), "train", &images, questions);
    let split = EasyVqaSplit::load(dir.path(), Split::Train).unwrap();
    assert_eq!(split.images()[0].shape, Shape::Rectangle);
    assert_eq!(split.images()[0].colour, ShapeColour::Red);
    assert_eq!(split.images()[0].shape_from, AnnotationSource::Questions);
    assert_eq!(split.images()[0].colour_from, AnnotationSource::Questions);
    // "what is the blue shape?" presupposes the colour.
    assert_eq!(split.images()[1].colour, ShapeColour::Blue);
    assert_eq!(split.images()[1].colour_from, AnnotationSource::Questions);
}

#[test]
fn contradicting_answers_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let images = [draw(Shape::Circle, ShapeColour::Green)];
    write_split(
        dir.path(),
        "test",
        &images,
        r#"[["what color is the shape?", "green", 0], ["is there a green shape?", "no", 0]]"#,
    );
    let error = EasyVqaSplit::load(dir.path(), Split::Test).unwrap_err();
    let message = error.to_string();
    assert!(message.contains("questions.json"), "{message}");
    assert!(message.contains("image 0"), "{message}");
    assert!(message.contains("is and is not green"), "{message}");

    write_split(
        dir.path(),
        "test",
        &images,
        r#"[["what shape is present?", "hexagon", 0]]"#,
    );
    let error = EasyVqaSplit::load(dir.path(), Split::Test).unwrap_err();
    assert!(error.to_string().contains("entry 0"), "{error}");
    assert!(error.to_string().contains("\"hexagon\""), "{error}");

    write_split(
        dir.path(),
        "test",
        &images,
        r#"[["what shape is present?", "circle", 3]]"#,
    );
    let error = EasyVqaSplit::load(dir.path(), Split::Test).unwrap_err();
    assert!(error.to_string().contains("refers to image 3"), "{error}");
}

#[test]
fn malformed_files_name_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let images = [draw(Shape::Circle, ShapeColour::Green)];
    write_split(
        dir.path(),
        "test",
        &images,
        "[\n  [\"what shape is present?\", \"circle\"]\n]",
    );
    let error = EasyVqaSplit::load(dir.path(), Split::Test).unwrap_err();
    assert!(
        matches!(error, DatasetError::InvalidJson { line: 2, .. }),
        "{error}"
    );
    assert!(
        error
            .to_string()
            .contains("[question, answer, image index]"),
        "{error}"
    );

    // A gap in the image numbering names the missing file.
    save(&dir.path().join("test/images/2.png"), &images[0]);
    write(&dir.path().join("test/questions.json"), "[]");
    let error = EasyVqaSplit::load(dir.path(), Split::Test).unwrap_err();
    assert!(error.to_string().contains("1.png"), "{error}");

    let error = EasyVqa::load(&dir.path().join("absent")).unwrap_err();
    assert!(
        error.to_string().contains("pip install easy-vqa==1.0"),
        "{error}"
    );
}

#[test]
fn item_ids_round_trip() {
    assert_eq!(easyvqa_item_id(Split::Test, 42), "evqa-test-00042");
    assert_eq!(
        parse_easyvqa_item_id("evqa-train-03999").unwrap(),
        (Split::Train, 3_999)
    );
    for bad in [
        "evqa-test-",
        "evqa-dev-00001",
        "fmnist-test-00001",
        "evqa-test-+1",
    ] {
        let error = parse_easyvqa_item_id(bad).unwrap_err();
        assert!(
            matches!(error, DatasetError::InvalidEasyVqaItemId { .. }),
            "{bad}: {error}"
        );
    }
}

#[test]
fn phrasings_are_disjoint() {
    let phrasings = [Phrasing::Train, Phrasing::Test, Phrasing::Validation];
    for (position, first) in phrasings.iter().enumerate() {
        for second in &phrasings[position + 1..] {
            let first_texts = all_shape_texts(*first);
            let second_texts = all_shape_texts(*second);
            let shared: Vec<&String> = first_texts.intersection(&second_texts).collect();
            assert!(
                shared.is_empty(),
                "texts in {first:?} and {second:?}: {shared:?}"
            );
        }
    }
    for phrasing in phrasings {
        // 4 templates per kind: 8 colours + 3 shapes + 24 (shape, colour) pairs.
        assert_eq!(
            all_shape_texts(phrasing).len(),
            4 * (8 + 3 + 24),
            "{phrasing:?}"
        );
    }
    for phrasing in phrasings {
        for template in shape_templates(phrasing, QueryKind::Colour) {
            assert!(
                template.contains("{colour}") && !template.contains("shape}"),
                "{template}"
            );
        }
        for template in shape_templates(phrasing, QueryKind::Class) {
            assert!(
                template.contains("{a_shape}") && !template.contains("{colour}"),
                "{template}"
            );
        }
        for template in shape_templates(phrasing, QueryKind::Both) {
            assert!(template.contains("{a_colour_shape}"), "{template}");
        }
    }
    assert_eq!(
        render_shape_template("draw {a_colour_shape}", Shape::Circle, ShapeColour::Teal),
        "draw a teal circle"
    );
}

fn check_relevant(split: &EasyVqaSplit, index: &ShapeIndex, query: &ShapeQuery) {
    let relevant = index.relevant(query);
    assert!(!relevant.is_empty(), "{query:?}");
    assert!(!relevant.contains(&query.reference));
    for position in &relevant {
        let image = split.image(*position).unwrap();
        assert_eq!(
            (image.shape, image.colour),
            (query.target_shape, query.target_colour)
        );
    }
    let expected = split
        .images()
        .iter()
        .filter(|image| image.shape == query.target_shape && image.colour == query.target_colour)
        .count()
        - usize::from(
            split.image(query.reference).unwrap().shape == query.target_shape
                && split.image(query.reference).unwrap().colour == query.target_colour,
        );
    assert_eq!(relevant.len(), expected);
}

#[test]
fn default_test_queries_change_the_named_attributes() {
    let data = data();
    let queries = default_shape_test_queries(&data.test).unwrap();
    assert_eq!(queries.len(), EASY_VQA_TEST_QUERY_COUNT);
    assert_eq!(
        queries,
        default_shape_test_queries(&data.test).unwrap(),
        "seeded"
    );
    let test_texts = all_shape_texts(Phrasing::Test);
    let index = ShapeIndex::full(&data.test);
    let mut kinds: HashMap<QueryKind, usize> = HashMap::new();
    for query in &queries {
        *kinds.entry(query.kind).or_default() += 1;
        let reference = data.test.image(query.reference).unwrap();
        assert_eq!(
            query.kind.changes_class(),
            query.target_shape != reference.shape,
            "{query:?}"
        );
        assert_eq!(
            query.kind.changes_colour(),
            query.target_colour != reference.colour,
            "{query:?}"
        );
        assert_eq!(query.texts, vec![query.text.clone()]);
        assert!(test_texts.contains(&query.text), "{:?}", query.text);
        check_relevant(&data.test, &index, query);
    }
    for kind in QueryKind::ALL {
        let count = kinds[&kind];
        assert!((333..=334).contains(&count), "{count} {kind} queries");
    }
}

#[test]
fn two_step_queries_apply_steps_in_order() {
    let data = data();
    let queries = default_two_step_shape_test_queries(&data.test).unwrap();
    assert_eq!(queries.len(), EASY_VQA_TWO_STEP_TEST_QUERY_COUNT);
    let index = ShapeIndex::full(&data.test);
    let mut colour_then_colour = 0;
    for query in &queries {
        assert_eq!(query.texts.len(), 2);
        assert_eq!(query.step_kinds.len(), 2);
        assert_eq!(query.text, query.texts.join(STEP_SEPARATOR));
        let reference = data.test.image(query.reference).unwrap();
        assert!(
            (query.target_shape, query.target_colour) != (reference.shape, reference.colour),
            "the final state differs from the reference"
        );
        // The last step names the final colour, or the final shape.
        let last = &query.texts[1];
        match query.step_kinds[1] {
            QueryKind::Colour => assert!(last.contains(query.target_colour.name()), "{last}"),
            QueryKind::Class => assert!(last.contains(query.target_shape.name()), "{last}"),
            QueryKind::Both => panic!("two-step plans change one attribute per step"),
        }
        if query.step_kinds == [QueryKind::Colour, QueryKind::Colour] {
            colour_then_colour += 1;
            // The first colour is overridden: the target has the second one only.
            let first_colour = ShapeColour::ALL
                .into_iter()
                .find(|colour| {
                    query.texts[0]
                        .split_whitespace()
                        .any(|word| word == colour.name())
                })
                .unwrap();
            assert_ne!(first_colour, query.target_colour);
            assert_ne!(first_colour, reference.colour);
            assert_eq!(query.kind, QueryKind::Colour);
            assert_eq!(query.target_shape, reference.shape);
        }
        check_relevant(&data.test, &index, query);
    }
    assert!(
        (166..=167).contains(&colour_then_colour),
        "{colour_then_colour}"
    );
}

#[test]
fn generation_rejects_an_empty_pool() {
    let config = QueryConfig {
        count: 3,
        phrasing: Phrasing::Train,
        seed: 1,
    };
    let error = generate_shape_queries(&data().train, &[], &config).unwrap_err();
    assert!(error.to_string().contains("empty pool"), "{error}");
    let error = generate_two_step_shape_queries(&data().train, &[], &config).unwrap_err();
    assert!(error.to_string().contains("empty pool"), "{error}");
}

#[test]
fn benchmark_loads_with_two_step_sets() {
    let spec: DatasetSpec = "easyvqa-shapes".parse().unwrap();
    let options = LoadOptions {
        train_images: Some(1_000),
        train_queries: Some(400),
        test_queries: Some(300),
        two_step_test_queries: 90,
        two_step_train_fraction: 0.25,
        seed: 9,
    };
    let benchmark = RetrievalBenchmark::load(&spec, &options).unwrap();
    assert_eq!(benchmark.train.catalog.len(), 1_000);
    assert_eq!(benchmark.train.queries.len(), 400);
    let two_step_train = benchmark
        .train
        .queries
        .iter()
        .filter(|query| query.texts.len() == 2)
        .count();
    assert_eq!(two_step_train, 100);
    let names: Vec<&str> = benchmark.test.iter().map(|set| set.name.as_str()).collect();
    assert_eq!(names, vec!["test", "two-step"]);
    assert_eq!(benchmark.test[0].queries.len(), 300);
    assert_eq!(benchmark.test[1].queries.len(), 90);

    for set in std::iter::once(&benchmark.train).chain(&benchmark.test) {
        let keys: HashMap<&str, i64> = set
            .catalog
            .iter()
            .map(|item| (item.id.as_str(), item.key))
            .collect();
        for query in &set.queries {
            assert!(
                keys.contains_key(query.reference_id.as_str()),
                "{}",
                query.reference_id
            );
            assert!(["colour", "shape", "both"].contains(&query.kind.as_str()));
            for id in query.relevant_ids.iter() {
                assert_eq!(keys[id.as_str()], query.target_key, "{id}");
            }
        }
    }
    let item = &benchmark.test[0].catalog[42];
    assert_eq!(item.id, "evqa-test-00042");
    assert!(Shape::ALL
        .iter()
        .any(|shape| shape.name() == item.metadata["shape"]));
    let image = benchmark.load_image(item).unwrap();
    assert_eq!((image.width(), image.height()), (64, 64));
}

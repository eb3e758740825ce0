//! Query generation checks against the Fashion-MNIST files on disk.

use std::collections::{BTreeSet, HashMap};
use std::sync::OnceLock;

use densebert4ret_datasets::{
    attribute_code, colour_of, default_test_queries, generate_queries, render_template,
    sample_indices, AttributeIndex, Colour, FashionClass, FashionMnist, Phrasing, Query,
    QueryConfig, QueryKind, Split, DEFAULT_TEST_QUERY_COUNT,
};

fn data() -> &'static FashionMnist {
    static DATA: OnceLock<FashionMnist> = OnceLock::new();
    DATA.get_or_init(|| {
        FashionMnist::load_default().expect(
            "Fashion-MNIST files under DB4R_FASHION_MNIST_DIR or /usr/share/datasets/fashion-mnist",
        )
    })
}

fn test_queries() -> &'static [Query] {
    static QUERIES: OnceLock<Vec<Query>> = OnceLock::new();
    QUERIES.get_or_init(|| default_test_queries(&data().test).unwrap())
}

const PHRASINGS: [Phrasing; 3] = [Phrasing::Train, Phrasing::Test, Phrasing::Validation];

#[test]
fn phrasing_templates_are_disjoint() {
    for (position, first) in PHRASINGS.iter().enumerate() {
        for second in &PHRASINGS[position + 1..] {
            for first_kind in QueryKind::ALL {
                for second_kind in QueryKind::ALL {
                    for template in first.templates(first_kind) {
                        assert!(
                            !second.templates(second_kind).contains(template),
                            "{template:?} is in {first:?} and {second:?}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn phrasing_texts_are_disjoint() {
    for (position, first) in PHRASINGS.iter().enumerate() {
        for second in &PHRASINGS[position + 1..] {
            let first_texts = first.all_texts();
            let second_texts = second.all_texts();
            let shared: Vec<&String> = first_texts.intersection(&second_texts).collect();
            assert!(
                shared.is_empty(),
                "texts in {first:?} and {second:?}: {shared:?}"
            );
        }
    }
    // 3 kinds x 4 templates x up to 80 (class, colour) fillings each.
    for phrasing in PHRASINGS {
        let count = phrasing.all_texts().len();
        assert!(count > 300, "only {count} {phrasing:?} texts");
    }
}

#[test]
fn templates_name_the_changed_attributes() {
    for phrasing in PHRASINGS {
        for template in phrasing.templates(QueryKind::Colour) {
            assert!(template.contains("{colour}"), "{template:?}");
            assert!(!template.contains("class}"), "{template:?}");
        }
        for template in phrasing.templates(QueryKind::Class) {
            assert!(template.contains("{a_class}"), "{template:?}");
            assert!(!template.contains("{colour}"), "{template:?}");
        }
        for template in phrasing.templates(QueryKind::Both) {
            assert!(template.contains("{a_colour_class}"), "{template:?}");
        }
        for kind in QueryKind::ALL {
            assert!(
                phrasing.templates(kind).len() >= 3,
                "{phrasing:?} {kind} has too few templates"
            );
        }
    }
}

#[test]
fn template_rendering_uses_articles() {
    assert_eq!(
        render_template(
            "a_colour_class: {a_colour_class}",
            FashionClass::Trousers,
            Colour::Orange
        ),
        "a_colour_class: an orange pair of trousers"
    );
    assert_eq!(
        render_template(
            "turn it into {a_class}",
            FashionClass::AnkleBoot,
            Colour::Red
        ),
        "turn it into an ankle boot"
    );
    assert_eq!(
        render_template("make it {colour}", FashionClass::Bag, Colour::Cyan),
        "make it cyan"
    );
}

#[test]
fn default_test_set_is_balanced() {
    let queries = test_queries();
    assert_eq!(queries.len(), DEFAULT_TEST_QUERY_COUNT);
    let mut per_kind: HashMap<QueryKind, usize> = HashMap::new();
    for query in queries {
        *per_kind.entry(query.kind).or_default() += 1;
    }
    for kind in QueryKind::ALL {
        let count = per_kind.get(&kind).copied().unwrap_or(0);
        assert!(
            count.abs_diff(DEFAULT_TEST_QUERY_COUNT / 3) <= 1,
            "{count} {kind} queries"
        );
    }
}

#[test]
fn targets_change_exactly_the_asked_attributes() {
    let test = &data().test;
    for query in test_queries() {
        let class = test.class(query.reference).unwrap();
        let colour = colour_of(Split::Test, query.reference);
        assert_eq!(
            query.target_class != class,
            query.kind.changes_class(),
            "{query:?} reference class {class}"
        );
        assert_eq!(
            query.target_colour != colour,
            query.kind.changes_colour(),
            "{query:?} reference colour {colour}"
        );
    }
}

#[test]
fn query_text_names_target_attributes() {
    for query in test_queries() {
        if query.kind.changes_colour() {
            assert!(query.text.contains(query.target_colour.name()), "{query:?}");
        }
        if query.kind.changes_class() {
            assert!(query.text.contains(query.target_class.noun()), "{query:?}");
        }
    }
}

#[test]
fn test_queries_use_test_phrasings() {
    let test_texts = Phrasing::Test.all_texts();
    let train_texts = Phrasing::Train.all_texts();
    for query in test_queries() {
        assert!(test_texts.contains(&query.text), "{:?}", query.text);
        assert!(!train_texts.contains(&query.text), "{:?}", query.text);
    }
}

#[test]
fn every_test_query_has_a_relevant_item() {
    let catalog = AttributeIndex::full(&data().test);
    let test = &data().test;
    for query in test_queries() {
        let relevant = catalog.relevant(query);
        assert!(!relevant.is_empty(), "{query:?} has no answer");
        assert!(
            !relevant.contains(&query.reference),
            "{query:?} lists its reference"
        );
        for index in relevant {
            assert_eq!(test.class(index).unwrap(), query.target_class);
            assert_eq!(colour_of(Split::Test, index), query.target_colour);
        }
    }
}

#[test]
fn relevant_items_exclude_the_reference() {
    let test = &data().test;
    let reference = 0;
    let query = Query {
        split: Split::Test,
        reference,
        text: "identical".to_owned(),
        texts: vec!["identical".to_owned()],
        step_kinds: vec![QueryKind::Colour],
        target_class: test.class(reference).unwrap(),
        target_colour: colour_of(Split::Test, reference),
        kind: QueryKind::Colour,
    };
    let catalog = AttributeIndex::full(test);
    let group = catalog.items(query.target_class, query.target_colour);
    assert!(group.contains(&reference));
    let relevant = catalog.relevant(&query);
    assert_eq!(relevant.len(), group.len() - 1);
    assert!(!relevant.contains(&reference));
}

#[test]
fn generation_is_seeded() {
    let test = &data().test;
    let pool: Vec<usize> = (0..test.len()).collect();
    let config = QueryConfig {
        count: 300,
        phrasing: Phrasing::Train,
        seed: 7,
    };
    let first = generate_queries(test, &pool, &config).unwrap();
    let second = generate_queries(test, &pool, &config).unwrap();
    assert_eq!(first, second);
    let other = generate_queries(test, &pool, &QueryConfig { seed: 8, ..config }).unwrap();
    assert_ne!(first, other);
}

#[test]
fn generation_stays_inside_the_pool() {
    let train = &data().train;
    let pool = sample_indices(train.len(), 500, 3).unwrap();
    let queries = generate_queries(
        train,
        &pool,
        &QueryConfig {
            count: 600,
            phrasing: Phrasing::Train,
            seed: 1,
        },
    )
    .unwrap();
    let pool_set: BTreeSet<usize> = pool.iter().copied().collect();
    let index = AttributeIndex::new(train, &pool).unwrap();
    for query in &queries {
        assert_eq!(query.split, Split::Train);
        assert!(pool_set.contains(&query.reference), "{query:?}");
        let relevant = index.relevant(query);
        assert!(!relevant.is_empty(), "{query:?}");
        assert!(
            relevant.iter().all(|item| pool_set.contains(item)),
            "{query:?}"
        );
    }
}

#[test]
fn generation_fails_on_unanswerable_pool() {
    let test = &data().test;
    let error = generate_queries(
        test,
        &[],
        &QueryConfig {
            count: 1,
            phrasing: Phrasing::Test,
            seed: 0,
        },
    )
    .unwrap_err();
    assert!(error.to_string().contains("empty pool"), "{error}");

    // A single image is never relevant to a query that changes it.
    let error = generate_queries(
        test,
        &[5],
        &QueryConfig {
            count: 1,
            phrasing: Phrasing::Test,
            seed: 0,
        },
    )
    .unwrap_err();
    assert!(error.to_string().contains("larger pool"), "{error}");
}

#[test]
fn sample_indices_are_distinct_and_sorted() {
    let indices = sample_indices(60_000, 20_000, 11).unwrap();
    assert_eq!(indices.len(), 20_000);
    assert!(indices.windows(2).all(|pair| pair[0] < pair[1]));
    assert!(*indices.last().unwrap() < 60_000);
    assert_eq!(indices, sample_indices(60_000, 20_000, 11).unwrap());
    assert_ne!(indices, sample_indices(60_000, 20_000, 12).unwrap());
    assert!(sample_indices(10, 11, 0).is_err());
}

#[test]
fn attribute_codes_are_unique() {
    let mut codes = BTreeSet::new();
    for class in FashionClass::ALL {
        for colour in Colour::ALL {
            let code = attribute_code(class, colour);
            assert!((0..80).contains(&code), "{class} {colour}: {code}");
            assert!(codes.insert(code), "{class} {colour} repeats code {code}");
        }
    }
    assert_eq!(attribute_code(FashionClass::AnkleBoot, Colour::White), 79);
    let query = &test_queries()[0];
    assert_eq!(
        query.target_code(),
        attribute_code(query.target_class, query.target_colour)
    );
}

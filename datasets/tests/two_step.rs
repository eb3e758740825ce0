//! Two-step Fashion-MNIST colours queries, checked against the files on disk.

use std::collections::HashMap;
use std::sync::OnceLock;

use densebert4ret_datasets::{
    colour_of, default_two_step_test_queries, generate_queries, generate_two_step_queries,
    render_template, sample_indices, AttributeIndex, Colour, FashionClass, FashionMnist, Phrasing,
    Query, QueryConfig, QueryKind, TwoStepPlan, DEFAULT_TWO_STEP_TEST_QUERY_COUNT, STEP_SEPARATOR,
};

fn data() -> &'static FashionMnist {
    static DATA: OnceLock<FashionMnist> = OnceLock::new();
    DATA.get_or_init(|| {
        FashionMnist::load_default().expect(
            "Fashion-MNIST files under DB4R_FASHION_MNIST_DIR or /usr/share/datasets/fashion-mnist",
        )
    })
}

fn two_step_queries() -> &'static [Query] {
    static QUERIES: OnceLock<Vec<Query>> = OnceLock::new();
    QUERIES.get_or_init(|| default_two_step_test_queries(&data().test).unwrap())
}

/// Finds the template of `kind` and the class and colour that render `text`.
fn rendered_from(
    phrasing: Phrasing,
    kind: QueryKind,
    text: &str,
) -> Option<(FashionClass, Colour)> {
    for template in phrasing.templates(kind) {
        for class in FashionClass::ALL {
            for colour in Colour::ALL {
                if render_template(template, class, colour) == text {
                    return Some((class, colour));
                }
            }
        }
    }
    None
}

#[test]
fn default_set_is_seeded_and_balanced() {
    let queries = two_step_queries();
    assert_eq!(queries.len(), DEFAULT_TWO_STEP_TEST_QUERY_COUNT);
    assert_eq!(
        queries,
        default_two_step_test_queries(&data().test)
            .unwrap()
            .as_slice()
    );
    let mut plans: HashMap<Vec<QueryKind>, usize> = HashMap::new();
    for query in queries {
        *plans.entry(query.step_kinds.clone()).or_default() += 1;
    }
    for plan in TwoStepPlan::ALL {
        let count = plans[&plan.step_kinds().to_vec()];
        assert!((333..=334).contains(&count), "{count} {plan} queries");
    }
}

#[test]
fn texts_are_joined_in_order() {
    for query in two_step_queries() {
        assert_eq!(query.texts.len(), 2);
        assert_eq!(query.text, query.texts.join(STEP_SEPARATOR));
        assert_eq!(
            query.text,
            format!("{}. {}", query.texts[0], query.texts[1])
        );
    }
}

#[test]
fn steps_lead_to_the_target() {
    let test = &data().test;
    for query in two_step_queries() {
        let class = test.class(query.reference).unwrap();
        let colour = colour_of(test.split(), query.reference);
        let mut state = (class, colour);
        for (text, &kind) in query.texts.iter().zip(&query.step_kinds) {
            let (step_class, step_colour) = rendered_from(Phrasing::Test, kind, text)
                .unwrap_or_else(|| panic!("{text:?} is not a test {kind} text"));
            match kind {
                QueryKind::Colour => {
                    assert_ne!(
                        step_colour, state.1,
                        "a colour step changes the colour: {query:?}"
                    );
                    state.1 = step_colour;
                }
                QueryKind::Class => {
                    assert_ne!(
                        step_class, state.0,
                        "a class step changes the class: {query:?}"
                    );
                    state.0 = step_class;
                }
                QueryKind::Both => panic!("two-step plans change one attribute per step"),
            }
        }
        assert_eq!(
            state,
            (query.target_class, query.target_colour),
            "{query:?}"
        );
        assert_ne!(
            state,
            (class, colour),
            "the target differs from the reference"
        );
        assert_eq!(query.kind.changes_class(), query.target_class != class);
        assert_eq!(query.kind.changes_colour(), query.target_colour != colour);
    }
}

#[test]
fn later_colour_step_wins() {
    let test = &data().test;
    let mut checked = 0;
    for query in two_step_queries() {
        if query.step_kinds != [QueryKind::Colour, QueryKind::Colour] {
            continue;
        }
        let (_, first) = rendered_from(Phrasing::Test, QueryKind::Colour, &query.texts[0]).unwrap();
        let (_, second) =
            rendered_from(Phrasing::Test, QueryKind::Colour, &query.texts[1]).unwrap();
        assert_ne!(first, second);
        assert_eq!(query.target_colour, second);
        assert_ne!(
            query.target_colour,
            colour_of(test.split(), query.reference)
        );
        assert_eq!(query.target_class, test.class(query.reference).unwrap());
        checked += 1;
    }
    assert!(checked > 300, "only {checked} colour-then-colour queries");
}

#[test]
fn relevant_items_have_the_final_attributes() {
    let test = &data().test;
    let index = AttributeIndex::full(test);
    for query in two_step_queries() {
        let relevant = index.relevant(query);
        assert!(!relevant.is_empty(), "{query:?}");
        assert!(!relevant.contains(&query.reference));
        for &position in &relevant {
            assert_eq!(test.class(position).unwrap(), query.target_class);
            assert_eq!(colour_of(test.split(), position), query.target_colour);
        }
    }
}

#[test]
fn training_phrasings_stay_out_of_tests() {
    let train = &data().train;
    let pool = sample_indices(train.len(), 3_000, 5).unwrap();
    let config = QueryConfig {
        count: 300,
        phrasing: Phrasing::Train,
        seed: 8,
    };
    let queries = generate_two_step_queries(train, &pool, &config).unwrap();
    assert_eq!(queries.len(), 300);
    let test_texts = Phrasing::Test.all_texts();
    for query in &queries {
        for (text, &kind) in query.texts.iter().zip(&query.step_kinds) {
            assert!(
                rendered_from(Phrasing::Train, kind, text).is_some(),
                "{text:?}"
            );
            assert!(!test_texts.contains(text), "{text:?}");
        }
        assert!(pool.binary_search(&query.reference).is_ok());
    }
}

#[test]
fn single_step_queries_list_one_text() {
    let test = &data().test;
    let pool: Vec<usize> = (0..test.len()).collect();
    let config = QueryConfig {
        count: 60,
        phrasing: Phrasing::Test,
        seed: 4,
    };
    for query in generate_queries(test, &pool, &config).unwrap() {
        assert_eq!(query.texts, vec![query.text.clone()]);
        assert_eq!(query.step_kinds, vec![query.kind]);
    }
}

#[test]
fn empty_pool_is_rejected() {
    let config = QueryConfig {
        count: 5,
        phrasing: Phrasing::Test,
        seed: 4,
    };
    let error = generate_two_step_queries(&data().test, &[], &config).unwrap_err();
    assert!(error.to_string().contains("empty pool"), "{error}");
}

//! easy-VQA shapes queries: a reference image plus texts that change its
//! shape, its colour or both, and the catalog images that satisfy them.
//!
//! The query kinds and two-step plans are those of Fashion-MNIST colours,
//! with the shape in the place of the garment class: [`QueryKind::Class`]
//! changes the shape, and [`TwoStepPlan::ColourThenClass`] changes the colour
//! and then the shape.

use std::collections::{BTreeSet, HashMap};

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::attributes::{shape_code, Shape, ShapeColour};
use super::data::EasyVqaSplit;
use crate::class::with_indefinite_article;
use crate::error::{DatasetError, Result};
use crate::queries::{Phrasing, QueryConfig, QueryKind, STEP_SEPARATOR};
use crate::{Split, TwoStepPlan};

/// Prefix of every easy-VQA catalog item id.
pub const EASY_VQA_ID_PREFIX: &str = "evqa";

/// Number of single-step test queries in the standard easy-VQA benchmark.
pub const EASY_VQA_TEST_QUERY_COUNT: usize = 1_000;

/// Seed of the standard single-step easy-VQA test set.
pub const EASY_VQA_TEST_QUERY_SEED: u64 = 614;

/// Number of two-step test queries in the standard easy-VQA benchmark.
pub const EASY_VQA_TWO_STEP_TEST_QUERY_COUNT: usize = 500;

/// Seed of the standard two-step easy-VQA test set.
pub const EASY_VQA_TWO_STEP_TEST_QUERY_SEED: u64 = 615;

/// Maximum references tried for one query before generation fails.
const MAX_REFERENCE_ATTEMPTS: usize = 10_000;

/// Id of image `index` of `split`, e.g. `evqa-test-00042`.
pub fn easyvqa_item_id(split: Split, index: usize) -> String {
    format!("{EASY_VQA_ID_PREFIX}-{split}-{index:05}")
}

/// Splits an id made by [`easyvqa_item_id`] back into its split and index.
pub fn parse_easyvqa_item_id(id: &str) -> Result<(Split, usize)> {
    let invalid = || DatasetError::InvalidEasyVqaItemId { id: id.to_owned() };
    let rest = id
        .strip_prefix(EASY_VQA_ID_PREFIX)
        .and_then(|rest| rest.strip_prefix('-'))
        .ok_or_else(invalid)?;
    let (split, index) = rest.split_once('-').ok_or_else(invalid)?;
    let split = split.parse::<Split>().map_err(|_| invalid())?;
    if index.is_empty() || !index.bytes().all(|byte| byte.is_ascii_digit()) {
        return Err(invalid());
    }
    let index = index.parse::<usize>().map_err(|_| invalid())?;
    Ok((split, index))
}

// Placeholders: {colour} is the colour name, {a_shape} the shape with its
// article ("a triangle"), {a_colour_shape} colour and shape with the article
// of the colour ("a teal circle").
const TRAIN_COLOUR: &[&str] = &[
    "paint it {colour}",
    "recolour the shape {colour}",
    "same shape, {colour} this time",
    "fill it with {colour}",
];
const TRAIN_SHAPE: &[&str] = &[
    "reshape it into {a_shape}",
    "draw {a_shape} instead",
    "same colour, but {a_shape}",
    "turn the shape into {a_shape}",
];
const TRAIN_BOTH: &[&str] = &[
    "draw {a_colour_shape}",
    "replace it with {a_colour_shape}",
    "it should be {a_colour_shape}",
    "swap in {a_colour_shape}",
];

const TEST_COLOUR: &[&str] = &[
    "what about {colour}",
    "keep the shape and use {colour}",
    "now colour it {colour}",
    "try it in {colour}",
];
const TEST_SHAPE: &[&str] = &[
    "keep the colour, make it {a_shape}",
    "how about {a_shape}",
    "{a_shape} in this colour",
    "use {a_shape} as the shape",
];
const TEST_BOTH: &[&str] = &[
    "show {a_colour_shape}",
    "{a_colour_shape} instead",
    "how about {a_colour_shape}",
    "i need {a_colour_shape}",
];

const VALIDATION_COLOUR: &[&str] = &[
    "colour it {colour}",
    "make the shape {colour}",
    "{colour} please",
    "same shape but {colour}",
];
const VALIDATION_SHAPE: &[&str] = &[
    "make it {a_shape}",
    "change the shape to {a_shape}",
    "i want {a_shape}",
    "{a_shape} with the same colour",
];
const VALIDATION_BOTH: &[&str] = &[
    "make it {a_colour_shape}",
    "give me {a_colour_shape}",
    "change it to {a_colour_shape}",
    "{a_colour_shape} please",
];

/// easy-VQA templates of `phrasing` for one query kind ([`QueryKind::Class`] changes the shape).
pub fn shape_templates(phrasing: Phrasing, kind: QueryKind) -> &'static [&'static str] {
    match (phrasing, kind) {
        (Phrasing::Train, QueryKind::Colour) => TRAIN_COLOUR,
        (Phrasing::Train, QueryKind::Class) => TRAIN_SHAPE,
        (Phrasing::Train, QueryKind::Both) => TRAIN_BOTH,
        (Phrasing::Test, QueryKind::Colour) => TEST_COLOUR,
        (Phrasing::Test, QueryKind::Class) => TEST_SHAPE,
        (Phrasing::Test, QueryKind::Both) => TEST_BOTH,
        (Phrasing::Validation, QueryKind::Colour) => VALIDATION_COLOUR,
        (Phrasing::Validation, QueryKind::Class) => VALIDATION_SHAPE,
        (Phrasing::Validation, QueryKind::Both) => VALIDATION_BOTH,
    }
}

/// Fills an easy-VQA template with a target shape and colour.
pub fn render_shape_template(template: &str, shape: Shape, colour: ShapeColour) -> String {
    template
        .replace(
            "{a_colour_shape}",
            &format!(
                "{} {}",
                with_indefinite_article(colour.name()),
                shape.name()
            ),
        )
        .replace("{a_shape}", &shape.with_article())
        .replace("{colour}", colour.name())
}

/// Returns every easy-VQA text `phrasing` can produce, over all kinds, shapes and colours.
pub fn all_shape_texts(phrasing: Phrasing) -> BTreeSet<String> {
    let mut texts = BTreeSet::new();
    for kind in QueryKind::ALL {
        for template in shape_templates(phrasing, kind) {
            for shape in Shape::ALL {
                for colour in ShapeColour::ALL {
                    texts.insert(render_shape_template(template, shape, colour));
                }
            }
        }
    }
    texts
}

/// A composed retrieval query over one easy-VQA split.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShapeQuery {
    /// Split of the reference image.
    pub split: Split,
    /// Index of the reference image.
    pub reference: usize,
    /// Texts of the steps in order; one entry for a single-step query.
    pub texts: Vec<String>,
    /// The texts joined with [`STEP_SEPARATOR`].
    pub text: String,
    /// Attributes each step changes, parallel to `texts`.
    pub step_kinds: Vec<QueryKind>,
    /// Shape of the relevant images.
    pub target_shape: Shape,
    /// Colour of the relevant images.
    pub target_colour: ShapeColour,
    /// Attributes that differ between the reference and the target.
    pub kind: QueryKind,
}

impl ShapeQuery {
    /// Integer code of the target, see [`shape_code`].
    pub fn target_code(&self) -> i64 {
        shape_code(self.target_shape, self.target_colour)
    }

    /// Catalog id of the reference image.
    pub fn reference_id(&self) -> String {
        easyvqa_item_id(self.split, self.reference)
    }
}

/// Images of a pool grouped by (shape, colour), to find the relevant images of a query.
#[derive(Debug, Clone)]
pub struct ShapeIndex {
    split: Split,
    groups: HashMap<(Shape, ShapeColour), Vec<usize>>,
    len: usize,
}

impl ShapeIndex {
    /// Groups the images `pool` of `data` by shape and colour.
    pub fn new(data: &EasyVqaSplit, pool: &[usize]) -> Result<Self> {
        let mut groups: HashMap<(Shape, ShapeColour), Vec<usize>> = HashMap::new();
        for &index in pool {
            let image = data.image(index)?;
            groups
                .entry((image.shape, image.colour))
                .or_default()
                .push(index);
        }
        Ok(Self {
            split: data.split(),
            groups,
            len: pool.len(),
        })
    }

    /// Groups every image of `data`.
    pub fn full(data: &EasyVqaSplit) -> Self {
        let mut groups: HashMap<(Shape, ShapeColour), Vec<usize>> = HashMap::new();
        for image in data.images() {
            groups
                .entry((image.shape, image.colour))
                .or_default()
                .push(image.index);
        }
        Self {
            split: data.split(),
            groups,
            len: data.len(),
        }
    }

    /// Split the pool belongs to.
    pub fn split(&self) -> Split {
        self.split
    }

    /// Number of images in the pool.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Returns true when the pool is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Pool images with the given shape and colour, in pool order.
    pub fn items(&self, shape: Shape, colour: ShapeColour) -> &[usize] {
        self.groups.get(&(shape, colour)).map_or(&[], Vec::as_slice)
    }

    /// Pool images relevant to `query`, reference excluded.
    pub fn relevant(&self, query: &ShapeQuery) -> Vec<usize> {
        self.items(query.target_shape, query.target_colour)
            .iter()
            .copied()
            .filter(|&index| !(query.split == self.split && index == query.reference))
            .collect()
    }
}

/// Attributes after each step of a query.
type States = Vec<(Shape, ShapeColour)>;

/// Lists the step states a single-step `kind` allows from (shape, colour).
fn single_step_candidates(kind: QueryKind, shape: Shape, colour: ShapeColour) -> Vec<States> {
    let shapes: Vec<Shape> = if kind.changes_class() {
        Shape::ALL
            .into_iter()
            .filter(|&other| other != shape)
            .collect()
    } else {
        vec![shape]
    };
    let colours: Vec<ShapeColour> = if kind.changes_colour() {
        ShapeColour::ALL
            .into_iter()
            .filter(|&other| other != colour)
            .collect()
    } else {
        vec![colour]
    };
    shapes
        .iter()
        .flat_map(|&target_shape| {
            colours
                .iter()
                .map(move |&target_colour| vec![(target_shape, target_colour)])
        })
        .collect()
}

/// Lists the step states a two-step `plan` allows from (shape, colour).
fn two_step_candidates(plan: TwoStepPlan, shape: Shape, colour: ShapeColour) -> Vec<States> {
    let other_shapes = || Shape::ALL.into_iter().filter(move |&other| other != shape);
    let other_colours = || {
        ShapeColour::ALL
            .into_iter()
            .filter(move |&other| other != colour)
    };
    match plan {
        TwoStepPlan::ColourThenClass => other_colours()
            .flat_map(|middle| {
                other_shapes().map(move |target| vec![(shape, middle), (target, middle)])
            })
            .collect(),
        TwoStepPlan::ClassThenColour => other_shapes()
            .flat_map(|middle| {
                other_colours().map(move |target| vec![(middle, colour), (middle, target)])
            })
            .collect(),
        TwoStepPlan::ColourThenColour => other_colours()
            .flat_map(|middle| {
                other_colours()
                    .filter(move |&target| target != middle)
                    .map(move |target| vec![(shape, middle), (shape, target)])
            })
            .collect(),
    }
}

/// Draws one query: a reference from `pool`, then step states whose final
/// (shape, colour) has a pool image, then one template per step.
fn generate_one(
    data: &EasyVqaSplit,
    pool: &[usize],
    index: &ShapeIndex,
    step_kinds: &[QueryKind],
    candidates_of: &dyn Fn(Shape, ShapeColour) -> Vec<States>,
    phrasing: Phrasing,
    rng: &mut ChaCha8Rng,
) -> Result<ShapeQuery> {
    for _ in 0..MAX_REFERENCE_ATTEMPTS {
        let reference = pool[rng.gen_range(0..pool.len())];
        let image = data.image(reference)?;
        let candidates: Vec<States> = candidates_of(image.shape, image.colour)
            .into_iter()
            .filter(|states| {
                states
                    .last()
                    .is_some_and(|&(shape, colour)| !index.items(shape, colour).is_empty())
            })
            .collect();
        let Some(states) = candidates.choose(rng) else {
            continue;
        };
        let Some(&(target_shape, target_colour)) = states.last() else {
            continue;
        };
        let texts: Vec<String> = step_kinds
            .iter()
            .zip(states)
            .map(|(&kind, &(shape, colour))| {
                let templates = shape_templates(phrasing, kind);
                render_shape_template(templates[rng.gen_range(0..templates.len())], shape, colour)
            })
            .collect();
        let kind = match (target_shape != image.shape, target_colour != image.colour) {
            (true, true) => QueryKind::Both,
            (true, false) => QueryKind::Class,
            _ => QueryKind::Colour,
        };
        return Ok(ShapeQuery {
            split: data.split(),
            reference,
            text: texts.join(STEP_SEPARATOR),
            texts,
            step_kinds: step_kinds.to_vec(),
            target_shape,
            target_colour,
            kind,
        });
    }
    Err(DatasetError::InvalidRequest(format!(
        "no query with steps {step_kinds:?} has a relevant image in the pool of {} easy-VQA {} images after {MAX_REFERENCE_ATTEMPTS} references; use a larger pool",
        pool.len(),
        data.split()
    )))
}

fn check_pool(data: &EasyVqaSplit, pool: &[usize], count: usize) -> Result<()> {
    if pool.is_empty() {
        return Err(DatasetError::InvalidRequest(format!(
            "cannot build {count} easy-VQA queries from an empty pool of {} images",
            data.split()
        )));
    }
    Ok(())
}

/// Generates single-step queries whose references and relevant images both come from `pool`.
///
/// Kinds are balanced to within one query. Each query picks a reference
/// uniformly, then a target uniformly among the (shape, colour) pairs that
/// differ in the attributes its kind changes and have another pool image.
pub fn generate_shape_queries(
    data: &EasyVqaSplit,
    pool: &[usize],
    config: &QueryConfig,
) -> Result<Vec<ShapeQuery>> {
    check_pool(data, pool, config.count)?;
    let index = ShapeIndex::new(data, pool)?;
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    let mut kinds: Vec<QueryKind> = (0..config.count)
        .map(|position| QueryKind::ALL[position % QueryKind::ALL.len()])
        .collect();
    kinds.shuffle(&mut rng);
    kinds
        .into_iter()
        .map(|kind| {
            let candidates = move |shape, colour| single_step_candidates(kind, shape, colour);
            generate_one(
                data,
                pool,
                &index,
                &[kind],
                &candidates,
                config.phrasing,
                &mut rng,
            )
        })
        .collect()
}

/// Generates two-step queries whose references and relevant images both come from `pool`.
///
/// Plans are balanced to within one query. Each step's text is a
/// single-step template of that step's kind, filled with the attributes after
/// the step. The final attributes always differ from the reference's.
pub fn generate_two_step_shape_queries(
    data: &EasyVqaSplit,
    pool: &[usize],
    config: &QueryConfig,
) -> Result<Vec<ShapeQuery>> {
    check_pool(data, pool, config.count)?;
    let index = ShapeIndex::new(data, pool)?;
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    let mut plans: Vec<TwoStepPlan> = (0..config.count)
        .map(|position| TwoStepPlan::ALL[position % TwoStepPlan::ALL.len()])
        .collect();
    plans.shuffle(&mut rng);
    plans
        .into_iter()
        .map(|plan| {
            let candidates = move |shape, colour| two_step_candidates(plan, shape, colour);
            generate_one(
                data,
                pool,
                &index,
                &plan.step_kinds(),
                &candidates,
                config.phrasing,
                &mut rng,
            )
        })
        .collect()
}

/// Standard easy-VQA test set: [`EASY_VQA_TEST_QUERY_COUNT`] single-step
/// queries over every test image with test phrasings.
pub fn default_shape_test_queries(test: &EasyVqaSplit) -> Result<Vec<ShapeQuery>> {
    let pool: Vec<usize> = (0..test.len()).collect();
    let config = QueryConfig {
        count: EASY_VQA_TEST_QUERY_COUNT,
        phrasing: Phrasing::Test,
        seed: EASY_VQA_TEST_QUERY_SEED,
    };
    generate_shape_queries(test, &pool, &config)
}

/// Standard easy-VQA two-step test set: [`EASY_VQA_TWO_STEP_TEST_QUERY_COUNT`]
/// queries over every test image with test phrasings.
pub fn default_two_step_shape_test_queries(test: &EasyVqaSplit) -> Result<Vec<ShapeQuery>> {
    let pool: Vec<usize> = (0..test.len()).collect();
    let config = QueryConfig {
        count: EASY_VQA_TWO_STEP_TEST_QUERY_COUNT,
        phrasing: Phrasing::Test,
        seed: EASY_VQA_TWO_STEP_TEST_QUERY_SEED,
    };
    generate_two_step_shape_queries(test, &pool, &config)
}

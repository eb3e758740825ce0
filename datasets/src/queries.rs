//! Modification queries: a reference image plus a text that changes its colour,
//! its class or both, and the catalog items that satisfy it.

use std::collections::{BTreeSet, HashMap};
use std::fmt;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::catalog::item_id;
use crate::class::with_indefinite_article;
use crate::colour::colour_of;
use crate::error::{DatasetError, Result};
use crate::idx::SplitData;
use crate::{Colour, FashionClass, Split};

/// Number of test queries in the standard benchmark.
pub const DEFAULT_TEST_QUERY_COUNT: usize = 2_000;

/// Seed of the standard test query set.
pub const DEFAULT_TEST_QUERY_SEED: u64 = 612;

/// Attributes a query changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueryKind {
    /// Same class, another colour.
    Colour,
    /// Same colour, another class.
    Class,
    /// Another class and another colour.
    Both,
}

impl QueryKind {
    /// All kinds, in the order used to balance a query set.
    pub const ALL: [QueryKind; 3] = [QueryKind::Colour, QueryKind::Class, QueryKind::Both];

    /// Lower-case name used in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            QueryKind::Colour => "colour",
            QueryKind::Class => "class",
            QueryKind::Both => "both",
        }
    }

    /// Returns true when the target colour differs from the reference's.
    pub fn changes_colour(self) -> bool {
        matches!(self, QueryKind::Colour | QueryKind::Both)
    }

    /// Returns true when the target class differs from the reference's.
    pub fn changes_class(self) -> bool {
        matches!(self, QueryKind::Class | QueryKind::Both)
    }
}

impl fmt::Display for QueryKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One of the three disjoint sets of phrasings.
///
/// Training queries use [`Phrasing::Train`] and test queries [`Phrasing::Test`],
/// so a test measures whether the model follows modification texts it never saw.
/// [`Phrasing::Validation`] is a third set for choosing the best epoch, so that model
/// selection also rewards following unseen texts without reading the test phrasings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phrasing {
    /// Phrasings for training queries.
    Train,
    /// Phrasings for test queries.
    Test,
    /// Phrasings for validation queries, seen in neither training nor test.
    Validation,
}

// Placeholders: {colour} is the colour name, {a_class} the class noun with its
// article ("an ankle boot"), {a_colour_class} the colour and class noun with
// the article of the colour ("an orange t-shirt").
const TRAIN_COLOUR: &[&str] = &[
    "make it {colour}",
    "change the colour to {colour}",
    "i want it in {colour}",
    "dye it {colour}",
];
const TRAIN_CLASS: &[&str] = &[
    "turn it into {a_class}",
    "change it to {a_class}",
    "make this {a_class} in the same colour",
    "swap it for {a_class}",
];
const TRAIN_BOTH: &[&str] = &[
    "make it {a_colour_class}",
    "turn it into {a_colour_class}",
    "i want {a_colour_class}",
    "change it to {a_colour_class}",
];

const TEST_COLOUR: &[&str] = &[
    "the same but in {colour}",
    "could it be {colour}",
    "show me this in {colour}",
    "{colour} would be better",
];
const TEST_CLASS: &[&str] = &[
    "i would prefer {a_class} instead",
    "the same colour but {a_class}",
    "something like this but as {a_class}",
    "do you have {a_class} in this colour",
];
const TEST_BOTH: &[&str] = &[
    "{a_colour_class} please",
    "i am looking for {a_colour_class}",
    "show me {a_colour_class} instead",
    "find {a_colour_class}",
];

const VALIDATION_COLOUR: &[&str] = &[
    "same item in {colour}",
    "can i have it in {colour}",
    "switch the colour to {colour}",
    "in {colour} instead",
];
const VALIDATION_CLASS: &[&str] = &[
    "replace it with {a_class}",
    "this colour, but {a_class}",
    "give me {a_class} like this",
    "i need {a_class} in the same colour",
];
const VALIDATION_BOTH: &[&str] = &[
    "get me {a_colour_class}",
    "what about {a_colour_class}",
    "i would like {a_colour_class}",
    "{a_colour_class} instead",
];

impl Phrasing {
    /// Templates of this phrasing set for one query kind.
    pub fn templates(self, kind: QueryKind) -> &'static [&'static str] {
        match (self, kind) {
            (Phrasing::Train, QueryKind::Colour) => TRAIN_COLOUR,
            (Phrasing::Train, QueryKind::Class) => TRAIN_CLASS,
            (Phrasing::Train, QueryKind::Both) => TRAIN_BOTH,
            (Phrasing::Test, QueryKind::Colour) => TEST_COLOUR,
            (Phrasing::Test, QueryKind::Class) => TEST_CLASS,
            (Phrasing::Test, QueryKind::Both) => TEST_BOTH,
            (Phrasing::Validation, QueryKind::Colour) => VALIDATION_COLOUR,
            (Phrasing::Validation, QueryKind::Class) => VALIDATION_CLASS,
            (Phrasing::Validation, QueryKind::Both) => VALIDATION_BOTH,
        }
    }

    /// Returns every text this phrasing set can produce, over all kinds, classes and colours.
    pub fn all_texts(self) -> BTreeSet<String> {
        let mut texts = BTreeSet::new();
        for kind in QueryKind::ALL {
            for template in self.templates(kind) {
                for class in FashionClass::ALL {
                    for colour in Colour::ALL {
                        texts.insert(render_template(template, class, colour));
                    }
                }
            }
        }
        texts
    }
}

/// Fills a template with a target class and colour.
pub fn render_template(template: &str, class: FashionClass, colour: Colour) -> String {
    template
        .replace(
            "{a_colour_class}",
            &format!(
                "{} {}",
                with_indefinite_article(colour.name()),
                class.noun()
            ),
        )
        .replace("{a_class}", &class.with_article())
        .replace("{colour}", colour.name())
}

/// A composed retrieval query over one split.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Query {
    /// Split of the reference image.
    pub split: Split,
    /// Index of the reference image in its split.
    pub reference: usize,
    /// Modification text. For a multi-step query it is the texts of all
    /// steps joined with [`STEP_SEPARATOR`], as the model crate's
    /// `join_modifications` joins them.
    pub text: String,
    /// Modification texts of the steps in the order they apply; a
    /// single-step query has one entry, equal to `text`.
    #[serde(default)]
    pub texts: Vec<String>,
    /// Attributes each step changes, parallel to `texts`.
    #[serde(default)]
    pub step_kinds: Vec<QueryKind>,
    /// Class of the relevant items.
    pub target_class: FashionClass,
    /// Colour of the relevant items.
    pub target_colour: Colour,
    /// Attributes that differ between the reference and the target, after all steps.
    pub kind: QueryKind,
}

impl Query {
    /// Integer code of the target, `class label * 8 + colour index`, unique per (class, colour).
    pub fn target_code(&self) -> i64 {
        attribute_code(self.target_class, self.target_colour)
    }

    /// Catalog id of the reference image.
    pub fn reference_id(&self) -> String {
        item_id(self.split, self.reference)
    }
}

/// Separator between the step texts in [`Query::text`] of a multi-step
/// query; equal to `MODIFICATION_SEPARATOR` of the model crate, which this
/// crate does not depend on.
pub const STEP_SEPARATOR: &str = ". ";

/// Integer code of a (class, colour) pair, `class label * 8 + colour index`, 0 to 79.
pub fn attribute_code(class: FashionClass, colour: Colour) -> i64 {
    i64::from(class.label()) * Colour::ALL.len() as i64 + colour.index() as i64
}

/// Items of a pool grouped by (class, colour), to find the relevant items of a query.
#[derive(Debug, Clone)]
pub struct AttributeIndex {
    split: Split,
    groups: HashMap<(FashionClass, Colour), Vec<usize>>,
    len: usize,
}

impl AttributeIndex {
    /// Groups the images `pool` of `data` by class and colour.
    pub fn new(data: &SplitData, pool: &[usize]) -> Result<Self> {
        let mut groups: HashMap<(FashionClass, Colour), Vec<usize>> = HashMap::new();
        for &index in pool {
            let class = data.class(index)?;
            groups
                .entry((class, colour_of(data.split(), index)))
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
    pub fn full(data: &SplitData) -> Self {
        let mut groups: HashMap<(FashionClass, Colour), Vec<usize>> = HashMap::new();
        for (index, &class) in data.labels().iter().enumerate() {
            groups
                .entry((class, colour_of(data.split(), index)))
                .or_default()
                .push(index);
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

    /// Pool images with the given class and colour, in pool order.
    pub fn items(&self, class: FashionClass, colour: Colour) -> &[usize] {
        self.groups.get(&(class, colour)).map_or(&[], Vec::as_slice)
    }

    /// Pool images relevant to `query`, reference excluded.
    pub fn relevant(&self, query: &Query) -> Vec<usize> {
        self.items(query.target_class, query.target_colour)
            .iter()
            .copied()
            .filter(|&index| !(query.split == self.split && index == query.reference))
            .collect()
    }
}

/// Settings of a generated query set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueryConfig {
    /// Number of queries; kinds are balanced to within one query.
    pub count: usize,
    /// Phrasing set of the texts.
    pub phrasing: Phrasing,
    /// Seed of the ChaCha8 generator that picks references, targets and templates.
    pub seed: u64,
}

/// Maximum references tried for one query before generation fails.
const MAX_REFERENCE_ATTEMPTS: usize = 10_000;

/// Generates queries whose references and relevant items both come from `pool`.
///
/// Each query picks a reference uniformly from the pool, then a target uniformly
/// among the classes and colours that differ from the reference in the
/// attributes its kind changes and have at least one other pool image. The
/// result depends only on the pool, the config and the algorithms of rand 0.8.
pub fn generate_queries(
    data: &SplitData,
    pool: &[usize],
    config: &QueryConfig,
) -> Result<Vec<Query>> {
    if pool.is_empty() {
        return Err(DatasetError::InvalidRequest(format!(
            "cannot build {} queries from an empty pool of {} images",
            config.count,
            data.split()
        )));
    }
    let index = AttributeIndex::new(data, pool)?;
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);

    let mut kinds: Vec<QueryKind> = (0..config.count)
        .map(|position| QueryKind::ALL[position % QueryKind::ALL.len()])
        .collect();
    kinds.shuffle(&mut rng);

    let mut queries = Vec::with_capacity(config.count);
    for kind in kinds {
        queries.push(generate_one(
            data,
            pool,
            &index,
            kind,
            config.phrasing,
            &mut rng,
        )?);
    }
    Ok(queries)
}

/// Standard test set: [`DEFAULT_TEST_QUERY_COUNT`] queries over every test image with test phrasings.
pub fn default_test_queries(test: &SplitData) -> Result<Vec<Query>> {
    let pool: Vec<usize> = (0..test.len()).collect();
    let config = QueryConfig {
        count: DEFAULT_TEST_QUERY_COUNT,
        phrasing: Phrasing::Test,
        seed: DEFAULT_TEST_QUERY_SEED,
    };
    generate_queries(test, &pool, &config)
}

pub(crate) fn generate_one(
    data: &SplitData,
    pool: &[usize],
    index: &AttributeIndex,
    kind: QueryKind,
    phrasing: Phrasing,
    rng: &mut ChaCha8Rng,
) -> Result<Query> {
    for _ in 0..MAX_REFERENCE_ATTEMPTS {
        let reference = pool[rng.gen_range(0..pool.len())];
        let class = data.class(reference)?;
        let colour = colour_of(data.split(), reference);

        let target_classes: Vec<FashionClass> = if kind.changes_class() {
            FashionClass::ALL
                .into_iter()
                .filter(|&other| other != class)
                .collect()
        } else {
            vec![class]
        };
        let target_colours: Vec<Colour> = if kind.changes_colour() {
            Colour::ALL
                .into_iter()
                .filter(|&other| other != colour)
                .collect()
        } else {
            vec![colour]
        };
        // The reference differs from every candidate target in at least one
        // attribute, so a non-empty group always holds another image.
        let candidates: Vec<(FashionClass, Colour)> = target_classes
            .iter()
            .flat_map(|&target_class| {
                target_colours
                    .iter()
                    .map(move |&target_colour| (target_class, target_colour))
            })
            .filter(|&(target_class, target_colour)| {
                !index.items(target_class, target_colour).is_empty()
            })
            .collect();
        let Some(&(target_class, target_colour)) = candidates.choose(rng) else {
            continue;
        };

        let templates = phrasing.templates(kind);
        let template = templates[rng.gen_range(0..templates.len())];
        let text = render_template(template, target_class, target_colour);
        return Ok(Query {
            split: data.split(),
            reference,
            texts: vec![text.clone()],
            step_kinds: vec![kind],
            text,
            target_class,
            target_colour,
            kind,
        });
    }
    Err(DatasetError::InvalidRequest(format!(
        "no {kind} query has a relevant item in the pool of {} {} images after {MAX_REFERENCE_ATTEMPTS} references; use a larger pool",
        pool.len(),
        data.split()
    )))
}

/// Draws `count` distinct indices below `len` with a seeded ChaCha8 generator, sorted ascending.
pub fn sample_indices(len: usize, count: usize, seed: u64) -> Result<Vec<usize>> {
    if count > len {
        return Err(DatasetError::InvalidRequest(format!(
            "cannot sample {count} distinct images from a split of {len}"
        )));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut indices = rand::seq::index::sample(&mut rng, len, count).into_vec();
    indices.sort_unstable();
    Ok(indices)
}

//! Two-step (multi-turn) Fashion-MNIST colours queries: two modification
//! texts applied in order, where the target has the attributes left after
//! both steps.

use std::fmt;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::colour::colour_of;
use crate::error::{DatasetError, Result};
use crate::idx::SplitData;
use crate::queries::{
    render_template, AttributeIndex, Phrasing, Query, QueryConfig, QueryKind, STEP_SEPARATOR,
};
use crate::{Colour, FashionClass};

/// Number of two-step test queries in the standard benchmark.
pub const DEFAULT_TWO_STEP_TEST_QUERY_COUNT: usize = 1_000;

/// Seed of the standard two-step test query set.
pub const DEFAULT_TWO_STEP_TEST_QUERY_SEED: u64 = 613;

/// Maximum references tried for one query before generation fails.
const MAX_REFERENCE_ATTEMPTS: usize = 10_000;

/// Order and kinds of the two steps of a query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TwoStepPlan {
    /// A colour change, then a class change that keeps the new colour.
    ColourThenClass,
    /// A class change, then a colour change.
    ClassThenColour,
    /// Two colour changes to different colours; the second one wins.
    ColourThenColour,
}

impl TwoStepPlan {
    /// All plans, in the order used to balance a query set.
    pub const ALL: [TwoStepPlan; 3] = [
        TwoStepPlan::ColourThenClass,
        TwoStepPlan::ClassThenColour,
        TwoStepPlan::ColourThenColour,
    ];

    /// Kinds of the two steps, in order.
    pub fn step_kinds(self) -> [QueryKind; 2] {
        match self {
            TwoStepPlan::ColourThenClass => [QueryKind::Colour, QueryKind::Class],
            TwoStepPlan::ClassThenColour => [QueryKind::Class, QueryKind::Colour],
            TwoStepPlan::ColourThenColour => [QueryKind::Colour, QueryKind::Colour],
        }
    }

    /// Attributes that differ between the reference and the final target.
    pub fn net_kind(self) -> QueryKind {
        match self {
            TwoStepPlan::ColourThenClass | TwoStepPlan::ClassThenColour => QueryKind::Both,
            TwoStepPlan::ColourThenColour => QueryKind::Colour,
        }
    }

    /// Kebab-case name used in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            TwoStepPlan::ColourThenClass => "colour-then-class",
            TwoStepPlan::ClassThenColour => "class-then-colour",
            TwoStepPlan::ColourThenColour => "colour-then-colour",
        }
    }
}

impl fmt::Display for TwoStepPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Attributes after each step: `[(class, colour) after step 1, after step 2]`.
type StepStates = [(FashionClass, Colour); 2];

/// Lists the step states `plan` allows from a reference of `class` and `colour`.
fn plan_candidates(plan: TwoStepPlan, class: FashionClass, colour: Colour) -> Vec<StepStates> {
    let other_classes = || {
        FashionClass::ALL
            .into_iter()
            .filter(move |&other| other != class)
    };
    let other_colours = || {
        Colour::ALL
            .into_iter()
            .filter(move |&other| other != colour)
    };
    match plan {
        TwoStepPlan::ColourThenClass => other_colours()
            .flat_map(|middle| {
                other_classes().map(move |target| [(class, middle), (target, middle)])
            })
            .collect(),
        TwoStepPlan::ClassThenColour => other_classes()
            .flat_map(|middle| {
                other_colours().map(move |target| [(middle, colour), (middle, target)])
            })
            .collect(),
        TwoStepPlan::ColourThenColour => other_colours()
            .flat_map(|middle| {
                other_colours()
                    .filter(move |&target| target != middle)
                    .map(move |target| [(class, middle), (class, target)])
            })
            .collect(),
    }
}

/// Generates two-step queries whose references and relevant items both come from `pool`.
///
/// Plans are balanced to within one query. Each query picks a reference
/// uniformly, then uniformly among the step states its plan allows whose final
/// (class, colour) has at least one pool image. Each step's text comes from
/// the single-step templates of `config.phrasing` for that step's kind,
/// filled with the attributes after the step. The final state always differs
/// from the reference, so the reference is never its own target.
pub fn generate_two_step_queries(
    data: &SplitData,
    pool: &[usize],
    config: &QueryConfig,
) -> Result<Vec<Query>> {
    if pool.is_empty() {
        return Err(DatasetError::InvalidRequest(format!(
            "cannot build {} two-step queries from an empty pool of {} images",
            config.count,
            data.split()
        )));
    }
    let index = AttributeIndex::new(data, pool)?;
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    let mut plans: Vec<TwoStepPlan> = (0..config.count)
        .map(|position| TwoStepPlan::ALL[position % TwoStepPlan::ALL.len()])
        .collect();
    plans.shuffle(&mut rng);

    let mut queries = Vec::with_capacity(config.count);
    for plan in plans {
        queries.push(generate_two_step(
            data,
            pool,
            &index,
            plan,
            config.phrasing,
            &mut rng,
        )?);
    }
    Ok(queries)
}

/// Standard two-step test set: [`DEFAULT_TWO_STEP_TEST_QUERY_COUNT`] queries
/// over every test image with test phrasings.
pub fn default_two_step_test_queries(test: &SplitData) -> Result<Vec<Query>> {
    let pool: Vec<usize> = (0..test.len()).collect();
    let config = QueryConfig {
        count: DEFAULT_TWO_STEP_TEST_QUERY_COUNT,
        phrasing: Phrasing::Test,
        seed: DEFAULT_TWO_STEP_TEST_QUERY_SEED,
    };
    generate_two_step_queries(test, &pool, &config)
}

fn generate_two_step(
    data: &SplitData,
    pool: &[usize],
    index: &AttributeIndex,
    plan: TwoStepPlan,
    phrasing: Phrasing,
    rng: &mut ChaCha8Rng,
) -> Result<Query> {
    for _ in 0..MAX_REFERENCE_ATTEMPTS {
        let reference = pool[rng.gen_range(0..pool.len())];
        let class = data.class(reference)?;
        let colour = colour_of(data.split(), reference);
        let candidates: Vec<StepStates> = plan_candidates(plan, class, colour)
            .into_iter()
            .filter(|states| !index.items(states[1].0, states[1].1).is_empty())
            .collect();
        let Some(&states) = candidates.choose(rng) else {
            continue;
        };

        let step_kinds = plan.step_kinds();
        let texts: Vec<String> = step_kinds
            .iter()
            .zip(states)
            .map(|(&kind, (step_class, step_colour))| {
                let templates = phrasing.templates(kind);
                let template = templates[rng.gen_range(0..templates.len())];
                render_template(template, step_class, step_colour)
            })
            .collect();
        let (target_class, target_colour) = states[1];
        return Ok(Query {
            split: data.split(),
            reference,
            text: texts.join(STEP_SEPARATOR),
            texts,
            step_kinds: step_kinds.to_vec(),
            target_class,
            target_colour,
            kind: plan.net_kind(),
        });
    }
    Err(DatasetError::InvalidRequest(format!(
        "no {plan} query has a relevant item in the pool of {} {} images after {MAX_REFERENCE_ATTEMPTS} references; use a larger pool",
        pool.len(),
        data.split()
    )))
}

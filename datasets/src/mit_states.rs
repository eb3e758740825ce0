//! Reader for MIT-States (Isola, Lim and Adelson, "Discovering States and
//! Transformations in Image Collections", CVPR 2015), with the queries and
//! noun split of TIRG (Vo et al., "Composing Text and Image for Image
//! Retrieval", CVPR 2019).
//!
//! Layout under the dataset root: `images/<adjective> <noun>/<file>.jpg`. A
//! folder whose adjective is the literal word `adj` ("adj apple") contains
//! the images of a noun without state annotation. Folders whose name has no
//! space are not states. TIRG skips both kinds, and so does this reader.
//!
//! TIRG holds out 49 of the 245 nouns for testing. A test query takes a test
//! image and another adjective seen with its noun. The query text is that
//! adjective, and the relevant items are all test images of (adjective, noun).
//!
//! The test nouns come from `test_nouns.txt` in the root when it exists (one
//! noun per line; put TIRG's list of 49 nouns there to compare with published
//! figures), otherwise from a seeded draw of [`DEFAULT_TEST_NOUN_COUNT`] nouns.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::benchmark::{
    BenchmarkItem, BenchmarkQuery, DatasetSpec, ImageLoader, ImageSource, KeyGroups, LoadOptions,
    QuerySet, RetrievalBenchmark,
};
use crate::error::{DatasetError, Result};
use crate::files::{malformed, missing, read_text, sorted_entries};
use crate::{sample_indices, Split};

/// Prefix of every MIT-States catalog item id.
pub const MIT_STATES_ID_PREFIX: &str = "mits";

/// Name of the optional test noun list in the dataset root.
pub const TEST_NOUNS_FILE: &str = "test_nouns.txt";

/// Number of test nouns in TIRG's split (of 245 nouns).
pub const DEFAULT_TEST_NOUN_COUNT: usize = 49;

/// Seed of the drawn noun split when the root has no [`TEST_NOUNS_FILE`].
pub const DEFAULT_NOUN_SPLIT_SEED: u64 = 245;

/// Adjective that marks a folder of unannotated images.
const UNANNOTATED_ADJECTIVE: &str = "adj";

/// File extensions accepted as images, compared in lower case.
const IMAGE_EXTENSIONS: [&str; 3] = ["jpg", "jpeg", "png"];

const LAYOUT_FIX: &str = "the MIT-States root must contain images/<adjective noun>/<file>.jpg, as in the release of Isola et al.";

/// Division of the nouns into training and test nouns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NounSplit {
    /// These nouns are the test nouns; every other noun is a training noun.
    TestNouns(BTreeSet<String>),
    /// `count` test nouns drawn with a ChaCha8 generator from the sorted noun list.
    Seeded {
        /// Number of test nouns.
        count: usize,
        /// Seed of the draw.
        seed: u64,
    },
}

impl NounSplit {
    /// Reads a noun list: one noun per line, blank lines and lines starting
    /// with `#` ignored.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = read_text(path, "write one test noun per line")?;
        let mut nouns = BTreeSet::new();
        for (number, line) in text.lines().enumerate() {
            let noun = line.trim();
            if noun.is_empty() || noun.starts_with('#') {
                continue;
            }
            if noun.contains(char::is_whitespace) {
                return Err(malformed(
                    path,
                    number + 1,
                    format!("{noun:?} is not a single noun"),
                    "write one noun per line, as in the MIT-States folder names",
                ));
            }
            nouns.insert(noun.to_owned());
        }
        Ok(NounSplit::TestNouns(nouns))
    }

    /// Split of `root`: [`TEST_NOUNS_FILE`] when present, else
    /// [`DEFAULT_TEST_NOUN_COUNT`] nouns drawn with [`DEFAULT_NOUN_SPLIT_SEED`].
    pub fn for_root(root: &Path) -> Result<Self> {
        let path = root.join(TEST_NOUNS_FILE);
        if path.is_file() {
            Self::from_file(&path)
        } else {
            Ok(NounSplit::Seeded {
                count: DEFAULT_TEST_NOUN_COUNT,
                seed: DEFAULT_NOUN_SPLIT_SEED,
            })
        }
    }

    /// Test nouns among `nouns`; a listed noun that the images lack is an error.
    pub fn test_nouns(&self, nouns: &BTreeSet<String>) -> Result<BTreeSet<String>> {
        match self {
            NounSplit::TestNouns(listed) => {
                let unknown: Vec<&str> = listed.difference(nouns).map(String::as_str).collect();
                if !unknown.is_empty() {
                    return Err(DatasetError::InvalidRequest(format!(
                        "test nouns {} have no images under images/; fix {TEST_NOUNS_FILE} or the image folders",
                        unknown.join(", ")
                    )));
                }
                Ok(listed.clone())
            }
            NounSplit::Seeded { count, seed } => {
                if *count >= nouns.len() {
                    return Err(DatasetError::InvalidRequest(format!(
                        "cannot hold out {count} test nouns from {} nouns and keep any for training; use fewer test nouns",
                        nouns.len()
                    )));
                }
                let sorted: Vec<&String> = nouns.iter().collect();
                let mut rng = ChaCha8Rng::seed_from_u64(*seed);
                Ok(sorted
                    .choose_multiple(&mut rng, *count)
                    .map(|noun| (*noun).clone())
                    .collect())
            }
        }
    }
}

/// One annotated MIT-States image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MitStatesImage {
    /// Path of the image file.
    pub path: PathBuf,
    /// State adjective, e.g. "ripe".
    pub adjective: String,
    /// Object noun, e.g. "apple".
    pub noun: String,
}

/// Every annotated MIT-States image, in folder then file-name order.
#[derive(Debug, Clone)]
pub struct MitStates {
    root: PathBuf,
    images: Vec<MitStatesImage>,
}

impl MitStates {
    /// Lists `images/<adjective noun>/` under `root`.
    pub fn load(root: &Path) -> Result<Self> {
        let images_dir = root.join("images");
        if !images_dir.is_dir() {
            return Err(missing(&images_dir, LAYOUT_FIX.to_owned()));
        }
        let mut images = Vec::new();
        let mut skipped_folders = 0_usize;
        for (folder, folder_path) in sorted_entries(&images_dir, LAYOUT_FIX)? {
            if !folder_path.is_dir() {
                continue;
            }
            let Some((adjective, noun)) = folder.split_once(' ') else {
                skipped_folders += 1;
                continue;
            };
            if adjective == UNANNOTATED_ADJECTIVE {
                skipped_folders += 1;
                continue;
            }
            if adjective.is_empty() || noun.is_empty() || noun.contains(' ') {
                return Err(DatasetError::DatasetFile {
                    path: folder_path,
                    source: std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("folder name {folder:?} is not <adjective> <noun> with one space"),
                    ),
                    fix: "rename the folder to <adjective> <noun>, or move it out of images/"
                        .to_owned(),
                });
            }
            for (file, path) in sorted_entries(&folder_path, LAYOUT_FIX)? {
                if file.starts_with('.') {
                    continue;
                }
                let extension = Path::new(&file)
                    .extension()
                    .and_then(|extension| extension.to_str())
                    .map(str::to_ascii_lowercase);
                if !extension
                    .is_some_and(|extension| IMAGE_EXTENSIONS.contains(&extension.as_str()))
                {
                    return Err(DatasetError::DatasetFile {
                        path,
                        source: std::io::Error::new(std::io::ErrorKind::InvalidData, "not an image file"),
                        fix: "MIT-States image folders hold only .jpg files; move other files out of images/".to_owned(),
                    });
                }
                images.push(MitStatesImage {
                    path,
                    adjective: adjective.to_owned(),
                    noun: noun.to_owned(),
                });
            }
        }
        if images.is_empty() {
            return Err(missing(
                &images_dir.join("<adjective noun>"),
                format!("no annotated image found; {LAYOUT_FIX}"),
            ));
        }
        tracing::debug!(images = images.len(), skipped_folders, root = %root.display(), "loaded MIT-States");
        Ok(Self {
            root: root.to_owned(),
            images,
        })
    }

    /// Dataset root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Returns all annotated images.
    pub fn images(&self) -> &[MitStatesImage] {
        &self.images
    }

    /// Returns every noun with at least one annotated image.
    pub fn nouns(&self) -> BTreeSet<String> {
        self.images.iter().map(|image| image.noun.clone()).collect()
    }

    /// Images of one side of a noun split, in order.
    pub fn split(&self, test_nouns: &BTreeSet<String>, split: Split) -> Vec<MitStatesImage> {
        self.images
            .iter()
            .filter(|image| test_nouns.contains(&image.noun) == (split == Split::Test))
            .cloned()
            .collect()
    }
}

/// A MIT-States query: reference image, target adjective and relevant images.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MitStatesQuery {
    /// Position of the reference image in its split.
    pub reference: usize,
    /// Adjective of the relevant images, which is also the query text (as in TIRG).
    pub target_adjective: String,
    /// Positions of every image of (target adjective, reference noun).
    pub relevant: Vec<usize>,
}

/// Image positions of `images` grouped by (adjective, noun).
fn state_groups(images: &[MitStatesImage]) -> BTreeMap<(&str, &str), Vec<usize>> {
    let mut groups: BTreeMap<(&str, &str), Vec<usize>> = BTreeMap::new();
    for (index, image) in images.iter().enumerate() {
        groups
            .entry((image.adjective.as_str(), image.noun.as_str()))
            .or_default()
            .push(index);
    }
    groups
}

/// Adjectives seen with each noun in `images`.
fn noun_adjectives(images: &[MitStatesImage]) -> BTreeMap<&str, BTreeSet<&str>> {
    let mut adjectives: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for image in images {
        adjectives
            .entry(image.noun.as_str())
            .or_default()
            .insert(image.adjective.as_str());
    }
    adjectives
}

fn query_for(
    groups: &BTreeMap<(&str, &str), Vec<usize>>,
    reference: usize,
    noun: &str,
    adjective: &str,
) -> MitStatesQuery {
    MitStatesQuery {
        reference,
        target_adjective: adjective.to_owned(),
        relevant: groups.get(&(adjective, noun)).cloned().unwrap_or_default(),
    }
}

/// TIRG's test queries: for every image, one query per other adjective of its noun.
pub fn all_adjective_queries(images: &[MitStatesImage]) -> Vec<MitStatesQuery> {
    let groups = state_groups(images);
    let adjectives = noun_adjectives(images);
    let mut queries = Vec::new();
    for (reference, image) in images.iter().enumerate() {
        for &adjective in adjectives.get(image.noun.as_str()).into_iter().flatten() {
            if adjective != image.adjective {
                queries.push(query_for(&groups, reference, &image.noun, adjective));
            }
        }
    }
    queries
}

/// Training queries: for every image whose noun has another adjective, one
/// query to an adjective drawn with a ChaCha8 generator seeded with `seed`.
pub fn sampled_adjective_queries(images: &[MitStatesImage], seed: u64) -> Vec<MitStatesQuery> {
    let groups = state_groups(images);
    let adjectives = noun_adjectives(images);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut queries = Vec::new();
    for (reference, image) in images.iter().enumerate() {
        let others: Vec<&str> = adjectives
            .get(image.noun.as_str())
            .into_iter()
            .flatten()
            .copied()
            .filter(|&adjective| adjective != image.adjective)
            .collect();
        if let Some(adjective) = others.choose(&mut rng) {
            queries.push(query_for(&groups, reference, &image.noun, adjective));
        }
    }
    queries
}

/// Catalog id of image `index` of `split`, e.g. `mits-test-000123`.
pub fn mit_states_item_id(split: Split, index: usize) -> String {
    format!("{MIT_STATES_ID_PREFIX}-{split}-{index:06}")
}

fn query_set(
    name: &str,
    split: Split,
    images: &[MitStatesImage],
    queries: &[MitStatesQuery],
) -> QuerySet {
    let keys: BTreeMap<(&str, &str), i64> = state_groups(images)
        .keys()
        .enumerate()
        .map(|(key, state)| (*state, key as i64))
        .collect();
    let catalog: Vec<BenchmarkItem> = images
        .iter()
        .enumerate()
        .map(|(index, image)| BenchmarkItem {
            id: mit_states_item_id(split, index),
            key: keys
                .get(&(image.adjective.as_str(), image.noun.as_str()))
                .copied()
                .unwrap_or(-1),
            image: ImageSource::File {
                path: image.path.clone(),
            },
            metadata: BTreeMap::from([
                ("adjective".to_owned(), image.adjective.clone()),
                ("noun".to_owned(), image.noun.clone()),
                ("split".to_owned(), split.as_str().to_owned()),
            ]),
        })
        .collect();
    let groups = KeyGroups::new(&catalog);
    let queries = queries
        .iter()
        .map(|query| {
            let noun = images[query.reference].noun.as_str();
            let reference_id = mit_states_item_id(split, query.reference);
            let target_key = keys
                .get(&(query.target_adjective.as_str(), noun))
                .copied()
                .unwrap_or(-1);
            BenchmarkQuery {
                relevant_ids: groups.relevant(target_key, &reference_id),
                reference_id,
                texts: vec![query.target_adjective.clone()],
                target_key,
                kind: "adjective".to_owned(),
            }
        })
        .collect();
    QuerySet {
        name: name.to_owned(),
        catalog,
        queries,
    }
}

pub(crate) fn load_benchmark(
    spec: &DatasetSpec,
    root: &Path,
    options: &LoadOptions,
) -> Result<RetrievalBenchmark> {
    let data = MitStates::load(root)?;
    let test_nouns = NounSplit::for_root(root)?.test_nouns(&data.nouns())?;
    let mut train = data.split(&test_nouns, Split::Train);
    if let Some(count) = options.train_images {
        let keep = sample_indices(train.len(), count, options.seed)?;
        train = keep.into_iter().map(|index| train[index].clone()).collect();
    }
    let mut train_queries = sampled_adjective_queries(&train, options.seed.wrapping_add(1));
    if let Some(count) = options.train_queries {
        if count < train_queries.len() {
            let keep = sample_indices(train_queries.len(), count, options.seed.wrapping_add(2))?;
            train_queries = keep
                .into_iter()
                .map(|index| train_queries[index].clone())
                .collect();
        }
    }
    let test = data.split(&test_nouns, Split::Test);
    let test_queries = all_adjective_queries(&test);
    tracing::debug!(test_nouns = test_nouns.len(), "split MIT-States nouns");
    Ok(RetrievalBenchmark {
        spec: spec.clone(),
        protocol: spec.protocol(),
        train: query_set("train", Split::Train, &train, &train_queries),
        test: vec![query_set("test", Split::Test, &test, &test_queries)],
        images: ImageLoader::new(None),
    })
}

//! Reader for Fashion200k (Han et al., "Automatic Spatially-aware Fashion
//! Concept Discovery", ICCV 2017) in the layout used by TIRG (Vo et al.,
//! "Composing Text and Image for Image Retrieval", CVPR 2019).
//!
//! Layout under the dataset root:
//!
//! ```text
//! labels/<category>_<split>_detect_all.txt   one image per line:
//!     <image path><TAB><detection score><TAB><description>
//! <image path>                                the image, relative to the root
//! test_queries.txt                            optional, TIRG's test pairs:
//!     <source image path> <target image path>
//! ```
//!
//! Queries follow TIRG. Two descriptions are neighbours when they differ by
//! exactly one word: removing one word from each leaves the same word
//! sequence. A query takes an image, a neighbour description and the text
//! "replace X with Y", where X is the source's word and Y the target's. The
//! relevant items are all images with the target description; the reference
//! never has it, so it is never relevant.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::benchmark::{
    BenchmarkItem, BenchmarkQuery, DatasetSpec, ImageLoader, ImageSource, KeyGroups, LoadOptions,
    QuerySet, RetrievalBenchmark,
};
use crate::error::{DatasetError, Result};
use crate::files::{malformed, missing, read_text, sorted_entries, words};
use crate::{sample_indices, Split};

/// Prefix of every Fashion200k catalog item id.
pub const FASHION200K_ID_PREFIX: &str = "f200k";

/// Name of TIRG's list of test pairs in the dataset root.
pub const TEST_QUERIES_FILE: &str = "test_queries.txt";

/// Seed of the test pairs built when the root has no [`TEST_QUERIES_FILE`].
pub const FASHION200K_TEST_QUERY_SEED: u64 = 200;

const LAYOUT_FIX: &str = "the Fashion200k root must contain labels/<category>_<split>_detect_all.txt with lines <image path><TAB><detection score><TAB><description>, as in the TIRG release";

/// The five garment categories of Fashion200k, one label file per category and split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fashion200kCategory {
    /// `dress_*_detect_all.txt`.
    Dress,
    /// `jacket_*_detect_all.txt`.
    Jacket,
    /// `pants_*_detect_all.txt`.
    Pants,
    /// `skirt_*_detect_all.txt`.
    Skirt,
    /// `top_*_detect_all.txt`.
    Top,
}

impl Fashion200kCategory {
    /// All categories in file-name order.
    pub const ALL: [Fashion200kCategory; 5] = [
        Fashion200kCategory::Dress,
        Fashion200kCategory::Jacket,
        Fashion200kCategory::Pants,
        Fashion200kCategory::Skirt,
        Fashion200kCategory::Top,
    ];

    /// Name as it appears in the label file names.
    pub fn as_str(self) -> &'static str {
        match self {
            Fashion200kCategory::Dress => "dress",
            Fashion200kCategory::Jacket => "jacket",
            Fashion200kCategory::Pants => "pants",
            Fashion200kCategory::Skirt => "skirt",
            Fashion200kCategory::Top => "top",
        }
    }

    /// Label file of this category and `split` under `root`.
    pub fn label_path(self, root: &Path, split: Split) -> PathBuf {
        root.join("labels")
            .join(format!("{self}_{split}_detect_all.txt"))
    }
}

impl fmt::Display for Fashion200kCategory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Fashion200kCategory {
    type Err = DatasetError;

    fn from_str(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|category| category.as_str() == name)
            .ok_or_else(|| DatasetError::UnknownCategory {
                dataset: "Fashion200k",
                name: name.to_owned(),
                expected: Self::ALL.map(Fashion200kCategory::as_str).join(", "),
            })
    }
}

/// One line of a label file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fashion200kImage {
    /// Image path relative to the dataset root, as written in the label file.
    pub path: String,
    /// Detector confidence written in the label file.
    pub detection_score: f64,
    /// Description, trimmed and with runs of whitespace collapsed to one space.
    ///
    /// NOTE: TIRG also renames '.', '?', '&' and '*' to words for its own
    /// vocabulary; the text encoders here read punctuation as is.
    pub description: String,
    /// Category of the label file.
    pub category: Fashion200kCategory,
}

/// The images of one Fashion200k split, in label-file order (categories in
/// [`Fashion200kCategory::ALL`] order, then lines in file order).
#[derive(Debug, Clone)]
pub struct Fashion200kSplit {
    split: Split,
    root: PathBuf,
    images: Vec<Fashion200kImage>,
}

impl Fashion200kSplit {
    /// Reads every `labels/<category>_<split>_detect_all.txt` under `root`.
    ///
    /// Every label file of the split must name a known category, and at least
    /// one must exist.
    pub fn load(root: &Path, split: Split) -> Result<Self> {
        let labels = root.join("labels");
        if !labels.is_dir() {
            return Err(missing(&labels, LAYOUT_FIX.to_owned()));
        }
        let suffix = format!("_{split}_detect_all.txt");
        let mut files = BTreeMap::new();
        for (name, path) in sorted_entries(&labels, LAYOUT_FIX)? {
            let Some(category) = name.strip_suffix(&suffix) else {
                continue;
            };
            let category = category.parse::<Fashion200kCategory>().map_err(|error| {
                DatasetError::MalformedLine {
                    path: path.clone(),
                    line: 0,
                    message: format!("the file name does not start with a Fashion200k category: {error}"),
                    fix: "rename or remove the file; label files are named <category>_<split>_detect_all.txt".to_owned(),
                }
            })?;
            files.insert(category, path);
        }
        if files.is_empty() {
            return Err(missing(
                &labels.join(format!("<category>{suffix}")),
                format!("no {split} label file found; {LAYOUT_FIX}"),
            ));
        }

        let mut images = Vec::new();
        for (category, path) in files {
            read_label_file(&path, category, &mut images)?;
        }
        tracing::debug!(%split, images = images.len(), root = %root.display(), "loaded Fashion200k split");
        Ok(Self {
            split,
            root: root.to_owned(),
            images,
        })
    }

    /// Split these images belong to.
    pub fn split(&self) -> Split {
        self.split
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.images.len()
    }

    /// Returns true when the split contains no image.
    pub fn is_empty(&self) -> bool {
        self.images.is_empty()
    }

    /// Returns all images in order.
    pub fn images(&self) -> &[Fashion200kImage] {
        &self.images
    }

    /// Absolute path of image `index`.
    pub fn image_path(&self, index: usize) -> Option<PathBuf> {
        self.images
            .get(index)
            .map(|image| self.root.join(&image.path))
    }

    /// Catalog id of image `index`, e.g. `f200k-test-000017`.
    pub fn item_id(&self, index: usize) -> String {
        format!("{FASHION200K_ID_PREFIX}-{}-{index:06}", self.split)
    }

    /// Image positions grouped by description.
    pub fn description_groups(&self) -> BTreeMap<&str, Vec<usize>> {
        let mut groups: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (index, image) in self.images.iter().enumerate() {
            groups
                .entry(image.description.as_str())
                .or_default()
                .push(index);
        }
        groups
    }
}

fn read_label_file(
    path: &Path,
    category: Fashion200kCategory,
    images: &mut Vec<Fashion200kImage>,
) -> Result<()> {
    let text = read_text(path, LAYOUT_FIX)?;
    let fix = "each line must be <image path><TAB><detection score><TAB><description>, as in the TIRG release of Fashion200k";
    for (number, line) in text.lines().enumerate() {
        let line_number = number + 1;
        if line.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split('\t').collect();
        let [image_path, score, description] = fields.as_slice() else {
            return Err(malformed(
                path,
                line_number,
                format!("expected 3 tab-separated fields, found {}", fields.len()),
                fix,
            ));
        };
        let image_path = image_path.trim();
        if image_path.is_empty() {
            return Err(malformed(
                path,
                line_number,
                "the image path is empty".to_owned(),
                fix,
            ));
        }
        let detection_score = score.trim().parse::<f64>().map_err(|_| {
            malformed(
                path,
                line_number,
                format!("detection score {score:?} is not a number"),
                fix,
            )
        })?;
        let description = words(description).join(" ");
        if description.is_empty() {
            return Err(malformed(
                path,
                line_number,
                "the description is empty".to_owned(),
                fix,
            ));
        }
        images.push(Fashion200kImage {
            path: image_path.to_owned(),
            detection_score,
            description,
            category,
        });
    }
    Ok(())
}

/// TIRG's modification text for a one-word change.
pub fn modification_text(removed: &str, added: &str) -> String {
    format!("replace {removed} with {added}")
}

/// Returns the (source word, target word) pair that turns `source` into
/// `target` when they differ by exactly one word, else `None`.
///
/// Two descriptions differ by one word when removing one word from each
/// leaves the same sequence and the two removed words differ.
pub fn one_word_difference(source: &str, target: &str) -> Option<(String, String)> {
    let source_words = words(source);
    let target_words = words(target);
    if source_words.len() != target_words.len() || source_words == target_words {
        return None;
    }
    for (source_position, source_word) in source_words.iter().enumerate() {
        let source_parent = without(&source_words, source_position);
        for (target_position, target_word) in target_words.iter().enumerate() {
            if source_word != target_word
                && without(&target_words, target_position) == source_parent
            {
                return Some(((*source_word).to_owned(), (*target_word).to_owned()));
            }
        }
    }
    None
}

fn without<'a>(words: &[&'a str], position: usize) -> Vec<&'a str> {
    words
        .iter()
        .enumerate()
        .filter(|&(index, _)| index != position)
        .map(|(_, word)| *word)
        .collect()
}

/// Descriptions filed under their "parents": every word sequence obtained by
/// removing one word, as in TIRG. Descriptions that share a parent and were
/// filed under it by removing different words differ by exactly one word.
///
/// Words are whole tokens here, whereas TIRG removes every occurrence of the
/// word as a substring.
struct ParentIndex<'a> {
    /// Members of each parent: (description position, removed word).
    parents: Vec<Vec<(usize, &'a str)>>,
    /// Parents of each description, by position in `parents`, with the word
    /// removed to reach them.
    memberships: Vec<Vec<(usize, &'a str)>>,
}

impl<'a> ParentIndex<'a> {
    fn new(descriptions: &[&'a str]) -> Self {
        let mut ids: HashMap<Vec<&'a str>, usize> = HashMap::new();
        let mut parents: Vec<Vec<(usize, &'a str)>> = Vec::new();
        let mut memberships = vec![Vec::new(); descriptions.len()];
        for (position, description) in descriptions.iter().enumerate() {
            let tokens = words(description);
            for (removed, word) in tokens.iter().enumerate() {
                let next_id = parents.len();
                let id = *ids.entry(without(&tokens, removed)).or_insert(next_id);
                if id == next_id {
                    parents.push(Vec::new());
                }
                // A repeated word yields the same parent twice; file it once.
                if !memberships[position].iter().any(|&(known, _)| known == id) {
                    memberships[position].push((id, *word));
                    parents[id].push((position, *word));
                }
            }
        }
        Self {
            parents,
            memberships,
        }
    }

    /// Lists the members of parent `id` that differ by one word from a
    /// description filed under it by removing `own_word`, as (member, source
    /// word, target word).
    fn siblings(&self, id: usize, own_word: &'a str) -> Vec<(usize, &'a str, &'a str)> {
        self.parents[id]
            .iter()
            .filter(|&&(_, word)| word != own_word)
            .map(|&(member, word)| (member, own_word, word))
            .collect()
    }

    /// Returns true when parent `id` has a member filed by removing a word
    /// other than `own_word`.
    fn has_sibling(&self, id: usize, own_word: &str) -> bool {
        self.parents[id].iter().any(|&(_, word)| word != own_word)
    }
}

/// For every description, the other descriptions of the split that differ
/// from it by exactly one word, each with the (source word, target word) pair.
///
/// Built as in TIRG: descriptions that share a "parent" (the sequence left
/// after removing one word) are neighbours. The result grows with the square
/// of the largest parent group, so [`one_word_queries`] samples from the
/// parent index instead of calling this.
pub fn neighbour_descriptions(
    descriptions: &[&str],
) -> BTreeMap<String, Vec<(String, String, String)>> {
    let index = ParentIndex::new(descriptions);
    let mut neighbours = BTreeMap::new();
    for (position, description) in descriptions.iter().enumerate() {
        let mut found: BTreeSet<(String, String, String)> = BTreeSet::new();
        for &(id, own_word) in &index.memberships[position] {
            for (target, source_word, target_word) in index.siblings(id, own_word) {
                found.insert((
                    descriptions[target].to_owned(),
                    source_word.to_owned(),
                    target_word.to_owned(),
                ));
            }
        }
        if !found.is_empty() {
            neighbours.insert((*description).to_owned(), found.into_iter().collect());
        }
    }
    neighbours
}

/// A Fashion200k query: reference image, TIRG text and relevant images.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fashion200kQuery {
    /// Position of the reference image in its split.
    pub reference: usize,
    /// Description the relevant images have.
    pub target_description: String,
    /// "replace X with Y".
    pub text: String,
    /// Positions of every image with `target_description`.
    pub relevant: Vec<usize>,
}

/// Builds one query per image whose description has a neighbour.
///
/// The target is drawn as TIRG draws its training pairs. First a parent of
/// the image's description that has a one-word sibling, then one such
/// sibling, both uniformly with a ChaCha8 generator seeded with `seed`, in
/// image order.
///
/// This builds the training pairs from the train split and, when the root has
/// no [`TEST_QUERIES_FILE`], the test pairs from the test split.
pub fn one_word_queries(data: &Fashion200kSplit, seed: u64) -> Vec<Fashion200kQuery> {
    let groups = data.description_groups();
    let descriptions: Vec<&str> = groups.keys().copied().collect();
    let positions: HashMap<&str, usize> = descriptions
        .iter()
        .enumerate()
        .map(|(position, description)| (*description, position))
        .collect();
    let index = ParentIndex::new(&descriptions);
    // Parents of each description that contain at least one one-word sibling.
    let usable: Vec<Vec<(usize, &str)>> = index
        .memberships
        .iter()
        .map(|parents| {
            parents
                .iter()
                .copied()
                .filter(|&(id, own_word)| index.has_sibling(id, own_word))
                .collect()
        })
        .collect();

    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut queries = Vec::new();
    for (reference, image) in data.images().iter().enumerate() {
        let Some(&position) = positions.get(image.description.as_str()) else {
            continue;
        };
        let Some(&(parent, own_word)) = usable[position].choose(&mut rng) else {
            continue;
        };
        let siblings = index.siblings(parent, own_word);
        let Some(&(target, source_word, target_word)) = siblings.choose(&mut rng) else {
            continue;
        };
        let target_description = descriptions[target];
        queries.push(Fashion200kQuery {
            reference,
            target_description: target_description.to_owned(),
            text: modification_text(source_word, target_word),
            relevant: groups.get(target_description).cloned().unwrap_or_default(),
        });
    }
    queries
}

/// Reads TIRG's `test_queries.txt`: one `<source path> <target path>` pair
/// per line, both images of the test split whose descriptions differ by one word.
pub fn read_test_queries(path: &Path, data: &Fashion200kSplit) -> Result<Vec<Fashion200kQuery>> {
    let text = read_text(
        path,
        "remove the file to build test pairs from the test split",
    )?;
    let by_path: HashMap<&str, usize> = data
        .images()
        .iter()
        .enumerate()
        .map(|(index, image)| (image.path.as_str(), index))
        .collect();
    let groups = data.description_groups();
    let fix = "each line must be <source image path> <target image path>, both listed in a labels/*_test_detect_all.txt file";
    let mut queries = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line_number = number + 1;
        if line.trim().is_empty() {
            continue;
        }
        let fields = words(line);
        let [source, target] = fields.as_slice() else {
            return Err(malformed(
                path,
                line_number,
                format!(
                    "expected 2 space-separated image paths, found {} fields",
                    fields.len()
                ),
                fix,
            ));
        };
        let position = |image: &str| {
            by_path.get(image).copied().ok_or_else(|| {
                malformed(
                    path,
                    line_number,
                    format!("image {image:?} is not in the test split"),
                    fix,
                )
            })
        };
        let (reference, target) = (position(source)?, position(target)?);
        let source_description = &data.images()[reference].description;
        let target_description = &data.images()[target].description;
        let Some((source_word, target_word)) =
            one_word_difference(source_description, target_description)
        else {
            return Err(malformed(
                path,
                line_number,
                format!("descriptions {source_description:?} and {target_description:?} do not differ by exactly one word"),
                fix,
            ));
        };
        queries.push(Fashion200kQuery {
            reference,
            target_description: target_description.clone(),
            text: modification_text(&source_word, &target_word),
            relevant: groups
                .get(target_description.as_str())
                .cloned()
                .unwrap_or_default(),
        });
    }
    Ok(queries)
}

/// Test queries of `root`: [`TEST_QUERIES_FILE`] when present, else
/// [`one_word_queries`] with [`FASHION200K_TEST_QUERY_SEED`].
pub fn test_queries(root: &Path, test: &Fashion200kSplit) -> Result<Vec<Fashion200kQuery>> {
    let path = root.join(TEST_QUERIES_FILE);
    if path.is_file() {
        read_test_queries(&path, test)
    } else {
        tracing::info!(root = %root.display(), "no {TEST_QUERIES_FILE}; building Fashion200k test pairs from the test split");
        Ok(one_word_queries(test, FASHION200K_TEST_QUERY_SEED))
    }
}

/// Keeps the images `pool` of `data` (sorted positions), renumbered from 0.
fn subset(data: &Fashion200kSplit, pool: &[usize]) -> Fashion200kSplit {
    Fashion200kSplit {
        split: data.split,
        root: data.root.clone(),
        images: pool
            .iter()
            .map(|&index| data.images[index].clone())
            .collect(),
    }
}

/// Catalog of a whole split and the given queries in the common form.
fn query_set(name: &str, data: &Fashion200kSplit, queries: &[Fashion200kQuery]) -> QuerySet {
    let keys: HashMap<&str, i64> = data
        .description_groups()
        .keys()
        .enumerate()
        .map(|(key, description)| (*description, key as i64))
        .collect();
    let catalog: Vec<BenchmarkItem> = data
        .images()
        .iter()
        .enumerate()
        .map(|(index, image)| BenchmarkItem {
            id: data.item_id(index),
            key: keys.get(image.description.as_str()).copied().unwrap_or(-1),
            image: ImageSource::File {
                path: data.root.join(&image.path),
            },
            metadata: BTreeMap::from([
                ("description".to_owned(), image.description.clone()),
                ("category".to_owned(), image.category.as_str().to_owned()),
                ("path".to_owned(), image.path.clone()),
                (
                    "detection_score".to_owned(),
                    image.detection_score.to_string(),
                ),
                ("split".to_owned(), data.split.as_str().to_owned()),
            ]),
        })
        .collect();
    let groups = KeyGroups::new(&catalog);
    let queries = queries
        .iter()
        .map(|query| {
            let reference_id = data.item_id(query.reference);
            let target_key = keys
                .get(query.target_description.as_str())
                .copied()
                .unwrap_or(-1);
            BenchmarkQuery {
                relevant_ids: groups.relevant(target_key, &reference_id),
                reference_id,
                texts: vec![query.text.clone()],
                target_key,
                kind: "word".to_owned(),
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
    let full_train = Fashion200kSplit::load(root, Split::Train)?;
    let train = match options.train_images {
        Some(count) => subset(
            &full_train,
            &sample_indices(full_train.len(), count, options.seed)?,
        ),
        None => full_train,
    };
    let mut train_queries = one_word_queries(&train, options.seed.wrapping_add(1));
    if let Some(count) = options.train_queries {
        if count < train_queries.len() {
            let keep = sample_indices(train_queries.len(), count, options.seed.wrapping_add(2))?;
            train_queries = keep
                .into_iter()
                .map(|index| train_queries[index].clone())
                .collect();
        }
    }
    let test = Fashion200kSplit::load(root, Split::Test)?;
    let test_queries = test_queries(root, &test)?;
    Ok(RetrievalBenchmark {
        spec: spec.clone(),
        protocol: spec.protocol(),
        train: query_set("train", &train, &train_queries),
        test: vec![query_set("test", &test, &test_queries)],
        images: ImageLoader::new(None),
    })
}

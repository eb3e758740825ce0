//! Reader for FashionIQ (Wu et al., "Fashion IQ: A New Dataset Towards
//! Retrieving Images by Natural Language Feedback", CVPR 2021).
//!
//! Layout under the dataset root:
//!
//! ```text
//! captions/cap.<category>.<split>.json         [{"candidate": NAME, "target": NAME, "captions": [TEXT, TEXT]}, ...]
//! image_splits/split.<category>.<split>.json   [NAME, ...]
//! images/<NAME>.png                            (or .jpg / .jpeg)
//! ```
//!
//! Categories are `dress`, `shirt` and `toptee`. The modification text of a
//! triplet is its two captions joined with " and ". Each category is
//! evaluated on its own catalog, the images of that category's split, with
//! Recall@10 and Recall@50 per category and their mean.
//!
//! The test query sets are built from the `val` split, because the released
//! `test` captions have no targets. Results on FashionIQ are usually reported
//! on `val` for the same reason.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::benchmark::{
    BenchmarkItem, BenchmarkQuery, DatasetSpec, ImageLoader, ImageSource, LoadOptions, QuerySet,
    RetrievalBenchmark,
};
use crate::error::{DatasetError, Result};
use crate::files::{missing, read_json, sorted_entries};
use crate::sample_indices;

/// Prefix of every FashionIQ catalog item id.
pub const FASHION_IQ_ID_PREFIX: &str = "fiq";

/// Separator between the two captions of a triplet.
pub const CAPTION_JOINER: &str = " and ";

/// Image file extensions tried for each image name, in order.
const IMAGE_EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

const LAYOUT_FIX: &str = "the FashionIQ root must contain captions/cap.<category>.<split>.json, image_splits/split.<category>.<split>.json and images/<name>.png";

/// The three FashionIQ categories.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FashionIqCategory {
    /// Dresses.
    Dress,
    /// Shirts.
    Shirt,
    /// Tops and tees.
    Toptee,
}

impl FashionIqCategory {
    /// All categories, in report order.
    pub const ALL: [FashionIqCategory; 3] = [
        FashionIqCategory::Dress,
        FashionIqCategory::Shirt,
        FashionIqCategory::Toptee,
    ];

    /// Name as it appears in file names.
    pub fn as_str(self) -> &'static str {
        match self {
            FashionIqCategory::Dress => "dress",
            FashionIqCategory::Shirt => "shirt",
            FashionIqCategory::Toptee => "toptee",
        }
    }

    /// Caption file of this category and `split` under `root`.
    pub fn captions_path(self, root: &Path, split: &str) -> PathBuf {
        root.join("captions")
            .join(format!("cap.{self}.{split}.json"))
    }

    /// Image list of this category and `split` under `root`.
    pub fn split_path(self, root: &Path, split: &str) -> PathBuf {
        root.join("image_splits")
            .join(format!("split.{self}.{split}.json"))
    }
}

impl fmt::Display for FashionIqCategory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for FashionIqCategory {
    type Err = DatasetError;

    fn from_str(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|category| category.as_str() == name)
            .ok_or_else(|| DatasetError::UnknownCategory {
                dataset: "FashionIQ",
                name: name.to_owned(),
                expected: Self::ALL.map(FashionIqCategory::as_str).join(", "),
            })
    }
}

/// One entry of a caption file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FashionIqTriplet {
    /// Name of the reference image.
    pub candidate: String,
    /// Name of the target image.
    pub target: String,
    /// The two relative captions written by annotators.
    pub captions: Vec<String>,
}

impl FashionIqTriplet {
    /// Builds the modification text: both captions, trimmed, joined with [`CAPTION_JOINER`].
    pub fn modification_text(&self) -> String {
        self.captions
            .iter()
            .map(|caption| caption.trim())
            .collect::<Vec<_>>()
            .join(CAPTION_JOINER)
    }
}

/// Triplets and images of one category and split.
#[derive(Debug, Clone)]
pub struct FashionIqSplit {
    /// Category of the files.
    pub category: FashionIqCategory,
    /// Split name: `train`, `val` or `test`.
    pub split: String,
    /// Image names of `split.<category>.<split>.json` whose files exist, in file order.
    pub images: Vec<String>,
    /// Image files by name.
    pub image_paths: HashMap<String, PathBuf>,
    /// Triplets whose candidate and target are both in `images`.
    pub triplets: Vec<FashionIqTriplet>,
}

impl FashionIqSplit {
    /// Reads the caption and image-split files of `category` and `split`.
    ///
    /// `image_files` maps image names to files under `images/`. Images listed
    /// in the split file but absent from `images/` are left out with the
    /// triplets that use them, and a warning counts them. Many FashionIQ image
    /// links no longer resolve, so local copies often lack a few images.
    pub fn load(
        root: &Path,
        category: FashionIqCategory,
        split: &str,
        image_files: &HashMap<String, PathBuf>,
    ) -> Result<Self> {
        let split_path = category.split_path(root, split);
        let listed: Vec<String> = read_json(
            &split_path,
            LAYOUT_FIX,
            "a JSON list of image names, as in FashionIQ's image_splits folder",
        )?;
        let captions_path = category.captions_path(root, split);
        let triplets: Vec<FashionIqTriplet> = read_json(
            &captions_path,
            LAYOUT_FIX,
            "a JSON list of {\"candidate\", \"target\", \"captions\": [two strings]}, as in FashionIQ's captions folder",
        )?;

        let mut images = Vec::with_capacity(listed.len());
        let mut missing_images = Vec::new();
        let mut image_paths = HashMap::new();
        for name in listed {
            match image_files.get(&name) {
                Some(path) => {
                    image_paths.insert(name.clone(), path.clone());
                    images.push(name);
                }
                None => missing_images.push(name),
            }
        }
        let listed_names: std::collections::HashSet<&str> = images
            .iter()
            .map(String::as_str)
            .chain(missing_images.iter().map(String::as_str))
            .collect();

        let mut kept = Vec::with_capacity(triplets.len());
        let mut dropped = 0_usize;
        for (position, triplet) in triplets.into_iter().enumerate() {
            if triplet.captions.len() != 2 {
                return Err(DatasetError::InconsistentAnnotation {
                    path: captions_path,
                    message: format!(
                        "entry {position} has {} captions; FashionIQ triplets have exactly 2, use the caption files of the original release",
                        triplet.captions.len()
                    ),
                });
            }
            for name in [&triplet.candidate, &triplet.target] {
                if !listed_names.contains(name.as_str()) {
                    return Err(DatasetError::InconsistentAnnotation {
                        path: captions_path,
                        message: format!(
                            "entry {position} names image {name:?}, which {} does not list; use caption and split files of the same release",
                            split_path.display()
                        ),
                    });
                }
            }
            if image_paths.contains_key(&triplet.candidate)
                && image_paths.contains_key(&triplet.target)
            {
                kept.push(triplet);
            } else {
                dropped += 1;
            }
        }
        if !missing_images.is_empty() {
            tracing::warn!(
                %category,
                split,
                missing_images = missing_images.len(),
                dropped_triplets = dropped,
                first_missing = %missing_images[0],
                "FashionIQ images listed in the split file are not under images/; they and their triplets are left out"
            );
        }
        Ok(Self {
            category,
            split: split.to_owned(),
            images,
            image_paths,
            triplets: kept,
        })
    }

    /// Catalog id of image `name`, e.g. `fiq-dress-B00006M009`.
    pub fn item_id(&self, name: &str) -> String {
        format!("{FASHION_IQ_ID_PREFIX}-{}-{name}", self.category)
    }
}

/// Image files under `root/images`, by name without extension; a name with
/// several files keeps the first of `.png`, `.jpg`, `.jpeg`.
pub fn image_files(root: &Path) -> Result<HashMap<String, PathBuf>> {
    let dir = root.join("images");
    if !dir.is_dir() {
        return Err(missing(&dir, LAYOUT_FIX.to_owned()));
    }
    let mut files: HashMap<String, (usize, PathBuf)> = HashMap::new();
    for (name, path) in sorted_entries(&dir, LAYOUT_FIX)? {
        let file = Path::new(&name);
        let (Some(stem), Some(extension)) = (
            file.file_stem().and_then(|stem| stem.to_str()),
            file.extension().and_then(|extension| extension.to_str()),
        ) else {
            continue;
        };
        let extension = extension.to_ascii_lowercase();
        let Some(rank) = IMAGE_EXTENSIONS
            .iter()
            .position(|known| *known == extension)
        else {
            continue;
        };
        let entry = files.entry(stem.to_owned()).or_insert((rank, path.clone()));
        if rank < entry.0 {
            *entry = (rank, path);
        }
    }
    Ok(files
        .into_iter()
        .map(|(name, (_, path))| (name, path))
        .collect())
}

fn catalog(data: &FashionIqSplit, first_key: i64) -> Vec<BenchmarkItem> {
    data.images
        .iter()
        .enumerate()
        .map(|(position, name)| BenchmarkItem {
            id: data.item_id(name),
            key: first_key + position as i64,
            image: ImageSource::File {
                path: data.image_paths.get(name).cloned().unwrap_or_default(),
            },
            metadata: BTreeMap::from([
                ("name".to_owned(), name.clone()),
                ("category".to_owned(), data.category.as_str().to_owned()),
                ("split".to_owned(), data.split.clone()),
            ]),
        })
        .collect()
}

fn queries(
    data: &FashionIqSplit,
    triplets: &[&FashionIqTriplet],
    keys: &HashMap<String, i64>,
) -> Vec<BenchmarkQuery> {
    triplets
        .iter()
        .filter(|triplet| triplet.candidate != triplet.target)
        .map(|triplet| {
            let target_id = data.item_id(&triplet.target);
            BenchmarkQuery {
                reference_id: data.item_id(&triplet.candidate),
                texts: vec![triplet.modification_text()],
                target_key: keys.get(&target_id).copied().unwrap_or(-1),
                relevant_ids: Arc::from(vec![target_id]),
                kind: "caption".to_owned(),
            }
        })
        .collect()
}

fn keys_of(catalog: &[BenchmarkItem]) -> HashMap<String, i64> {
    catalog
        .iter()
        .map(|item| (item.id.clone(), item.key))
        .collect()
}

pub(crate) fn load_benchmark(
    spec: &DatasetSpec,
    root: &Path,
    options: &LoadOptions,
) -> Result<RetrievalBenchmark> {
    let files = image_files(root)?;

    let mut train_catalog = Vec::new();
    let mut train_queries = Vec::new();
    let mut test = Vec::new();
    for category in FashionIqCategory::ALL {
        let train = FashionIqSplit::load(root, category, "train", &files)?;
        let items = catalog(&train, train_catalog.len() as i64);
        let keys = keys_of(&items);
        let triplets: Vec<&FashionIqTriplet> = train.triplets.iter().collect();
        train_queries.extend(queries(&train, &triplets, &keys));
        train_catalog.extend(items);

        let val = FashionIqSplit::load(root, category, "val", &files)?;
        let items = catalog(&val, 0);
        let keys = keys_of(&items);
        let triplets: Vec<&FashionIqTriplet> = val.triplets.iter().collect();
        test.push(QuerySet {
            name: category.as_str().to_owned(),
            queries: queries(&val, &triplets, &keys),
            catalog: items,
        });
    }

    // A drawn image subset keeps only the triplets whose candidate and target
    // were both drawn, so small subsets keep few triplets.
    if let Some(count) = options.train_images {
        let keep = sample_indices(train_catalog.len(), count, options.seed)?;
        train_catalog = keep
            .into_iter()
            .map(|index| train_catalog[index].clone())
            .collect();
        let kept: std::collections::HashSet<&str> =
            train_catalog.iter().map(|item| item.id.as_str()).collect();
        train_queries.retain(|query| {
            kept.contains(query.reference_id.as_str())
                && query
                    .relevant_ids
                    .iter()
                    .all(|id| kept.contains(id.as_str()))
        });
    }
    if let Some(count) = options.train_queries {
        if count < train_queries.len() {
            let keep = sample_indices(train_queries.len(), count, options.seed.wrapping_add(2))?;
            train_queries = keep
                .into_iter()
                .map(|index| train_queries[index].clone())
                .collect();
        }
    }
    Ok(RetrievalBenchmark {
        spec: spec.clone(),
        protocol: spec.protocol(),
        train: QuerySet {
            name: "train".to_owned(),
            catalog: train_catalog,
            queries: train_queries,
        },
        test,
        images: ImageLoader::new(None),
    })
}

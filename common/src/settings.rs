//! Layered configuration through the `config` crate: built-in defaults, then
//! an optional TOML file, then environment variables.

use std::path::Path;

use anyhow::Context;
use serde::{de::DeserializeOwned, Serialize};

/// Loads settings of type `T`.
///
/// Values come from `T::default()`, then from `file` when given, then from
/// environment variables named `{env_prefix}__{FIELD}` (nested fields joined
/// by `__`, for example `ENCODER__BATCHING__MAX_BATCH_SIZE=32`). Later layers
/// override earlier ones. Comma-separated environment values fill list fields.
pub fn load_settings<T>(file: Option<&Path>, env_prefix: &str) -> anyhow::Result<T>
where
    T: Default + Serialize + DeserializeOwned,
{
    let defaults = config::Config::try_from(&T::default())
        .context("failed to serialise the default settings")?;

    let mut builder = config::Config::builder().add_source(defaults);
    if let Some(path) = file {
        if !path.exists() {
            anyhow::bail!(
                "configuration file {} does not exist; pass an existing TOML file or omit --config",
                path.display()
            );
        }
        builder = builder.add_source(config::File::from(path).format(config::FileFormat::Toml));
    }
    builder = builder.add_source(
        config::Environment::with_prefix(env_prefix)
            .prefix_separator("__")
            .separator("__")
            .list_separator(",")
            .with_list_parse_key("shards")
            .try_parsing(true),
    );

    builder
        .build()
        .context("failed to read the configuration")?
        .try_deserialize()
        .with_context(|| format!("invalid configuration (file {file:?}, environment prefix {env_prefix}__)"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct Example {
        listen: String,
        max_k: u32,
        nested: Nested,
    }

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct Nested {
        threads: u32,
    }

    impl Default for Example {
        fn default() -> Self {
            Self { listen: "127.0.0.1:1".into(), max_k: 10, nested: Nested { threads: 2 } }
        }
    }

    #[test]
    fn file_overrides_defaults() {
        let dir = std::env::temp_dir().join(format!("db4r-settings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("example.toml");
        std::fs::write(&path, "max_k = 99\n[nested]\nthreads = 7\n").unwrap();

        let settings: Example = load_settings(Some(&path), "DB4R_SETTINGS_TEST_FILE").unwrap();

        assert_eq!(settings.listen, "127.0.0.1:1");
        assert_eq!(settings.max_k, 99);
        assert_eq!(settings.nested.threads, 7);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn environment_overrides_defaults() {
        std::env::set_var("DB4R_SETTINGS_TEST_ENV__NESTED__THREADS", "5");

        let settings: Example = load_settings(None, "DB4R_SETTINGS_TEST_ENV").unwrap();

        assert_eq!(settings.nested.threads, 5);
        assert_eq!(settings.max_k, 10);
    }

    #[test]
    fn missing_file_is_an_error() {
        let error = load_settings::<Example>(Some(Path::new("/nonexistent/db4r.toml")), "X")
            .unwrap_err();
        assert!(error.to_string().contains("/nonexistent/db4r.toml"));
    }
}

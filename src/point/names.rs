//! The names users write for closed sets of values — a point's type, table and word
//! order; a line's parity; a bus's protocol — each kept in one table per type
//! ([`Named::NAMES`]), from which its `Display`, `FromStr`, serde and command-line parsing
//! all come.
//!
//! Invariants: every value of a [`Named`] type appears in its table exactly once (the
//! types' unit tests check it); a name is matched exactly (case matters, as serde's derive
//! did); an unknown name is reported in serde's words — ``unknown variant `x`, expected
//! one of `a`, `b` `` — listing only the names the place accepts, so the config error
//! messages are those the derived enums gave.

use std::fmt;

/// A closed set of values (an enum), each variant with one name. A name names a variant:
/// a variant with a payload (a point type's `Bit(n)`) is in the table once, with any
/// payload, and every value of it has that name.
pub trait Named: Copy + Sized + 'static {
    /// Every variant with its name, in the order an error message lists them.
    const NAMES: &'static [(Self, &'static str)];

    /// This value's name.
    fn name(self) -> &'static str {
        Self::NAMES.iter().find(|(v, _)| same_variant(*v, self)).map_or("?", |(_, n)| n)
    }
}

/// True if `a` and `b` are the same variant, whatever their payloads.
fn same_variant<T>(a: T, b: T) -> bool {
    std::mem::discriminant(&a) == std::mem::discriminant(&b)
}

/// The value named `name`, if the table has it.
pub fn parse<T: Named>(name: &str) -> Option<T> {
    T::NAMES.iter().find(|(_, n)| *n == name).map(|(v, _)| *v)
}

/// The value named `name` if it is one of `allowed`, else serde's unknown-variant message
/// listing the names of `allowed`.
pub fn parse_among<T: Named>(name: &str, allowed: &[T]) -> Result<T, String> {
    match parse::<T>(name) {
        Some(v) if allowed.iter().any(|a| same_variant(*a, v)) => Ok(v),
        _ => Err(unknown(name, allowed.iter().map(|v| v.name()))),
    }
}

/// serde's message for a name that is none of `names`.
pub fn unknown<'a>(name: &str, names: impl IntoIterator<Item = &'a str>) -> String {
    let names: Vec<String> = names.into_iter().map(|n| format!("`{n}`")).collect();
    let expected = match names.as_slice() {
        [] => return format!("unknown variant `{name}`, there are no variants"),
        [one] => one.clone(),
        [a, b] => format!("{a} or {b}"),
        many => format!("one of {}", many.join(", ")),
    };
    format!("unknown variant `{name}`, expected {expected}")
}

/// Every value of `T`, in table order.
pub fn all<T: Named>() -> Vec<T> {
    all_where(|_| true)
}

/// The values of `T` that `accepts` admits, in table order.
pub fn all_where<T: Named>(accepts: impl Fn(T) -> bool) -> Vec<T> {
    T::NAMES.iter().map(|(v, _)| *v).filter(|v| accepts(*v)).collect()
}

/// Deserializes one of `allowed` from its name, as serde's derive would deserialize a
/// unit-only enum of just those values (same messages for a wrong type or an unknown
/// name).
pub fn deserialize_among<'de, D, T>(deserializer: D, allowed: &[T]) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Named,
{
    struct Visit<'a, T>(&'a [T]);
    impl<'de, T: Named> serde::de::Visitor<'de> for Visit<'_, T> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a name")
        }
        fn visit_str<E: serde::de::Error>(self, name: &str) -> Result<T, E> {
            parse_among(name, self.0).map_err(E::custom)
        }
        fn visit_enum<A: serde::de::EnumAccess<'de>>(self, data: A) -> Result<T, A::Error> {
            use serde::de::{Error, VariantAccess};
            let (name, variant): (String, _) = data.variant()?;
            let value = parse_among(&name, self.0).map_err(A::Error::custom)?;
            variant.unit_variant()?;
            Ok(value)
        }
    }
    deserializer.deserialize_enum("name", &[], Visit(allowed))
}

/// Gives a [`Named`] type `Display` (its name), `FromStr` (any name of its table; the
/// error is serde's unknown-variant message), `Serialize` (its name) and `Deserialize`
/// (any name of its table).
macro_rules! named_impls {
    ($t:ty) => {
        impl ::std::fmt::Display for $t {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str($crate::point::names::Named::name(*self))
            }
        }
        impl ::serde::Serialize for $t {
            fn serialize<S: ::serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str($crate::point::names::Named::name(*self))
            }
        }
        impl<'de> ::serde::Deserialize<'de> for $t {
            fn deserialize<D: ::serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                $crate::point::names::deserialize_among(d, &$crate::point::names::all::<$t>())
            }
        }
    };
}

/// Declares a newtype over a [`Named`] type that deserializes only the values `accepts`
/// admits (for a key that takes part of a table, e.g. a map entry's `type`, which has no
/// `bit`); its unknown-name message lists those values' names, in table order.
macro_rules! named_subset {
    ($(#[$doc:meta])* $vis:vis struct $name:ident($inner:ty) where $accepts:expr;) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        $vis struct $name(pub $inner);
        impl<'de> ::serde::Deserialize<'de> for $name {
            fn deserialize<D: ::serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let allowed = $crate::point::names::all_where::<$inner>($accepts);
                $crate::point::names::deserialize_among(d, &allowed).map($name)
            }
        }
    };
}

pub(crate) use {named_impls, named_subset};

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Abc {
        A,
        B,
        C,
    }
    impl Named for Abc {
        const NAMES: &'static [(Self, &'static str)] = &[(Abc::A, "a"), (Abc::B, "b"), (Abc::C, "c")];
    }

    #[test]
    fn unknown_names_read_as_serde_wrote_them() {
        let err = |m: &str| Err::<Abc, String>(m.to_string());
        assert_eq!(parse_among("x", &[Abc::A]), err("unknown variant `x`, expected `a`"));
        assert_eq!(parse_among("x", &[Abc::A, Abc::B]), err("unknown variant `x`, expected `a` or `b`"));
        assert_eq!(
            parse_among("c", &[Abc::A, Abc::B, Abc::B]),
            err("unknown variant `c`, expected one of `a`, `b`, `b`")
        );
        assert_eq!(parse_among("b", &all::<Abc>()), Ok(Abc::B));
        assert_eq!(parse::<Abc>("B"), None, "names match exactly");
        assert_eq!(Abc::C.name(), "c");
    }

    /// Every variant of `T` once, every name once, and each name reads back as its value.
    pub(crate) fn table_is_one_to_one<T: Named + PartialEq + std::fmt::Debug>(count: usize) {
        let names: std::collections::HashSet<&str> = T::NAMES.iter().map(|(_, n)| *n).collect();
        assert_eq!(names.len(), count, "{} names", std::any::type_name::<T>());
        assert_eq!(T::NAMES.len(), count);
        for (v, n) in T::NAMES {
            assert_eq!(parse::<T>(n), Some(*v));
            assert_eq!(v.name(), *n);
        }
    }

    #[test]
    fn point_tables_are_one_to_one() {
        use crate::point::value::{DataType, Table, WordOrder};
        table_is_one_to_one::<Table>(4);
        table_is_one_to_one::<WordOrder>(4);
        table_is_one_to_one::<DataType>(11);
        assert_eq!(DataType::Bit(7).name(), "bit", "a name names a variant, whatever its payload");
        assert_eq!(DataType::Str(12).name(), "string");
        table_is_one_to_one::<Abc>(3);
    }

    #[test]
    fn serde_and_display_use_the_table() {
        use crate::point::value::{DataType, Table, WordOrder};
        #[derive(serde::Deserialize)]
        struct Keys {
            table: Table,
            order: WordOrder,
            r#type: DataType,
        }
        let k: Keys =
            toml::from_str("table = 'input'\norder = 'cdab'\ntype = 'string'").expect("valid names");
        assert_eq!((k.table, k.order, k.r#type), (Table::Input, WordOrder::Cdab, DataType::Str(0)));
        assert_eq!(Table::Input.to_string(), "input");
        let bad = toml::from_str::<Keys>("table = 'hodling'\norder = 'abcd'\ntype = 'u16'").map(|_| ());
        let msg = bad.expect_err("unknown table").message().to_string();
        assert_eq!(msg, "unknown variant `hodling`, expected one of `coils`, `discrete`, `holding`, `input`");
        let wrong = toml::from_str::<Keys>("table = 5\norder = 'abcd'\ntype = 'u16'").map(|_| ());
        assert_eq!(wrong.expect_err("not a string").message(), "wanted string or table");
        assert_eq!(serde_json::to_string(&Table::Holding).expect("serializes"), "\"holding\"");
    }
}

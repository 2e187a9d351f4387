//! Which objects and list elements a change's operations act on and which they create, read
//! from the change's bytes (the column layout of the Automerge binary format, "change chunk").
//!
//! Automerge 0.7 applies an operation without checking that what it names exists: one on an
//! object the document does not hold panics (`op_set2/change/batch.rs:865`, "Obj Missing from
//! Index"), and so can one keyed by a list element no change inserted (`batch.rs:146`). It
//! checks the columns' encoding when it parses a change, not what the values name, and its
//! own op reader is not public, so the columns that name objects, keys and actors are read
//! here. Nothing here panics or allocates past the change's operation count,
//! whatever the bytes.

use automerge::Change;

/// What [`read`] found.
#[derive(Debug, Default)]
pub(super) struct Objects {
    /// Objects the operations act on, other than the root: (counter, actor index), where
    /// index 0 is the change's author and `k` its `k`th other actor. Sorted, without repeats.
    pub(super) touched: Vec<(u64, usize)>,
    /// Counters of the objects the change creates (their actor is the change's author).
    pub(super) made: Vec<u64>,
    /// List and text elements the operations name as their key (not the head), each with its
    /// object: ((object counter, actor index), (element counter, actor index)). Sorted,
    /// without repeats.
    pub(super) elements: Vec<((u64, usize), (u64, usize))>,
    /// Elements the change inserts: (object, counter of the inserting operation, whose actor
    /// is the change's author).
    pub(super) inserted: Vec<((u64, usize), u64)>,
}

const MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];
const CHUNK_CHANGE: u8 = 1;
// Column specifications: id << 4 | deflate bit (8) | type (actor 1, integer 2, group 0).
const OBJ_ACTOR: u64 = 1;
const OBJ_CTR: u64 = 2;
const KEY_ACTOR: u64 = 1 << 4 | 1;
const KEY_CTR: u64 = 1 << 4 | 3;
const INSERT: u64 = 3 << 4 | 4;
const ACTION: u64 = 4 << 4 | 2;
const PRED_ACTOR: u64 = 7 << 4 | 1;
const DEFLATE: u64 = 8;
// Actions that create an object: make map, list, text, table.
const MAKES: [u64; 4] = [0, 2, 4, 6];

/// Reads `change`'s object and actor references. An error says what is malformed: an actor
/// index past the change's actors, an object half named, columns that do not parse.
pub(super) fn read(change: &Change) -> Result<Objects, String> {
    let ops = change.len();
    let actors = 1 + change.other_actor_ids().len();
    let columns = columns(change.raw_bytes())?;
    let col = |spec: u64| {
        columns
            .iter()
            .find(|(s, _)| *s == spec)
            .map_or(&[][..], |(_, data)| *data)
    };
    let obj_actor = rle(col(OBJ_ACTOR), ops)?;
    let obj_ctr = rle(col(OBJ_CTR), ops)?;
    let action = rle(col(ACTION), ops)?;
    let key_actor = rle(col(KEY_ACTOR), ops)?;
    let key_ctr = delta(col(KEY_CTR), ops)?;
    let insert = booleans(col(INSERT), ops)?;
    actor_indexes_below(col(PRED_ACTOR), actors)?;
    let mut found = Objects::default();
    let start_op = change.start_op().get();
    for i in 0..ops {
        let id = start_op + i as u64;
        let obj = match (at(&obj_actor, i), at(&obj_ctr, i)) {
            (None, None) => None,
            (Some(a), Some(c)) if a < actors as u64 => Some((c, a as usize)),
            (Some(a), Some(_)) => {
                return Err(format!(
                    "operation {i} names actor {a} of the change's {actors}"
                ));
            }
            _ => return Err(format!("operation {i} names half an object")),
        };
        found.touched.extend(obj);
        if at(&action, i).is_some_and(|a| MAKES.contains(&a)) {
            found.made.push(id);
        }
        // A key is a map key (no actor, no counter), the head of a sequence (counter 0), or
        // an element: an operation that inserted into the sequence.
        let key = match (at(&key_actor, i), key_ctr.get(i).copied().flatten()) {
            (None, None) | (None, Some(0)) => None,
            (Some(a), Some(c)) if a < actors as u64 && c > 0 => Some((c as u64, a as usize)),
            _ => return Err(format!("operation {i} has a malformed key")),
        };
        let inserts = insert.get(i).copied().unwrap_or(false);
        match (obj, key) {
            (Some(obj), Some(key)) => found.elements.push((obj, key)),
            (None, Some(_)) => return Err(format!("operation {i} names an element of the root")),
            _ => {}
        }
        if inserts {
            match obj {
                Some(obj) => found.inserted.push((obj, id)),
                None => return Err(format!("operation {i} inserts into the root")),
            }
        }
    }
    found.touched.sort_unstable();
    found.touched.dedup();
    found.elements.sort_unstable();
    found.elements.dedup();
    Ok(found)
}

fn at(values: &[Option<u64>], i: usize) -> Option<u64> {
    values.get(i).copied().flatten()
}

/// Reads the LEB128 numbers and byte runs of Automerge's chunks, never past their end.
pub(crate) struct Reader<'a> {
    pub(crate) bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn byte(&mut self) -> Result<u8, String> {
        let (&b, rest) = self.bytes.split_first().ok_or("the change ends early")?;
        self.bytes = rest;
        Ok(b)
    }

    pub(crate) fn uleb(&mut self) -> Result<u64, String> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            value |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err("a number is longer than 64 bits".into())
    }

    fn sleb(&mut self) -> Result<i64, String> {
        let mut value = 0i64;
        let mut shift = 0;
        loop {
            let b = self.byte()?;
            if shift >= 64 {
                return Err("a number is longer than 64 bits".into());
            }
            value |= i64::from(b & 0x7f) << shift;
            shift += 7;
            if b & 0x80 == 0 {
                if shift < 64 && b & 0x40 != 0 {
                    value |= -1i64 << shift;
                }
                return Ok(value);
            }
        }
    }

    pub(crate) fn take(&mut self, n: u64) -> Result<&'a [u8], String> {
        let n = usize::try_from(n).map_err(|_| "a length is too large")?;
        if n > self.bytes.len() {
            return Err("the change ends early".into());
        }
        let (taken, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(taken)
    }

    pub(crate) fn skip_prefixed(&mut self) -> Result<(), String> {
        let n = self.uleb()?;
        self.take(n).map(|_| ())
    }
}

/// The change's operation columns: (specification, data).
fn columns(bytes: &[u8]) -> Result<Vec<(u64, &[u8])>, String> {
    let mut r = Reader { bytes };
    if r.take(4)? != MAGIC {
        return Err("not an Automerge chunk".into());
    }
    r.take(4)?; // checksum, checked by Automerge
    if r.byte()? != CHUNK_CHANGE {
        return Err("not an uncompressed change chunk".into());
    }
    let len = r.uleb()?;
    let mut r = Reader {
        bytes: r.take(len)?,
    };
    let deps = r.uleb()?;
    r.take(deps.checked_mul(32).ok_or("too many dependencies")?)?;
    r.skip_prefixed()?; // actor
    r.uleb()?; // seq
    r.uleb()?; // start op
    r.sleb()?; // time
    r.skip_prefixed()?; // message
    for _ in 0..r.uleb()? {
        r.skip_prefixed()?; // other actors
    }
    let count = r.uleb()?;
    let mut specs = Vec::new();
    for _ in 0..count {
        let spec = r.uleb()?;
        if spec & DEFLATE != 0 {
            return Err("a compressed column in a change".into());
        }
        specs.push((spec, r.uleb()?));
        if specs.len() > r.bytes.len() {
            return Err("more columns than bytes".into());
        }
    }
    specs
        .into_iter()
        .map(|(spec, len)| Ok((spec, r.take(len)?)))
        .collect()
}

/// Decodes an RLE column of unsigned integers (null allowed) of at most `max` values.
fn rle(bytes: &[u8], max: usize) -> Result<Vec<Option<u64>>, String> {
    rle_of(bytes, max, Reader::uleb)
}

/// Decodes a delta column (an RLE column of signed differences) of at most `max` values.
fn delta(bytes: &[u8], max: usize) -> Result<Vec<Option<i64>>, String> {
    let mut sum = 0i64;
    rle_of(bytes, max, Reader::sleb)?
        .into_iter()
        .map(|d| match d {
            None => Ok(None),
            Some(d) => {
                sum = sum.checked_add(d).ok_or("a counter overflows")?;
                Ok(Some(sum))
            }
        })
        .collect()
}

/// Decodes a boolean column (run lengths, alternately false and true) of at most `max`
/// values.
fn booleans(bytes: &[u8], max: usize) -> Result<Vec<bool>, String> {
    let mut out = Vec::new();
    let mut r = Reader { bytes };
    let mut value = false;
    while !r.bytes.is_empty() {
        let n = r.uleb()?;
        if n > (max - out.len()) as u64 {
            return Err(format!(
                "a column holds more than the change's {max} operations"
            ));
        }
        out.extend(std::iter::repeat_n(value, n as usize));
        value = !value;
    }
    Ok(out)
}

fn rle_of<'a, T: Copy>(
    bytes: &'a [u8],
    max: usize,
    read: fn(&mut Reader<'a>) -> Result<T, String>,
) -> Result<Vec<Option<T>>, String> {
    let mut out = Vec::new();
    let mut r = Reader { bytes };
    let too_many = || format!("a column holds more than the change's {max} operations");
    while !r.bytes.is_empty() {
        let count = r.sleb()?;
        let (n, value) = if count > 0 {
            (count.unsigned_abs(), Some(Some(read(&mut r)?)))
        } else if count < 0 {
            (count.unsigned_abs(), None)
        } else {
            (r.uleb()?, Some(None))
        };
        if n > (max - out.len()) as u64 {
            return Err(too_many());
        }
        match value {
            Some(v) => out.extend(std::iter::repeat_n(v, n as usize)),
            None => {
                for _ in 0..n {
                    out.push(Some(read(&mut r)?));
                }
            }
        }
    }
    Ok(out)
}

/// Checks that every actor index in an RLE actor column is one of the change's `actors`,
/// without expanding runs (a column may repeat a value more times than it has bytes).
fn actor_indexes_below(bytes: &[u8], actors: usize) -> Result<(), String> {
    let mut r = Reader { bytes };
    let check = |a: u64| {
        if a < actors as u64 {
            Ok(())
        } else {
            Err(format!(
                "an operation names actor {a} of the change's {actors}"
            ))
        }
    };
    while !r.bytes.is_empty() {
        let count = r.sleb()?;
        if count > 0 {
            check(r.uleb()?)?;
        } else if count < 0 {
            for _ in 0..count.unsigned_abs() {
                check(r.uleb()?)?;
            }
        } else {
            r.uleb()?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use automerge::transaction::Transactable;
    use automerge::{ActorId, Automerge, ObjType, ROOT};

    use super::*;

    /// One change that makes a map in the root and writes into it and into an object of an
    /// earlier change.
    fn sample() -> (Change, u64) {
        let mut doc = Automerge::new();
        doc.set_actor(ActorId::from(&[1u8; 16][..]));
        let mut tx = doc.transaction();
        let list = tx.put_object(ROOT, "l", ObjType::List).unwrap();
        tx.commit();
        doc.set_actor(ActorId::from(&[2u8; 16][..]));
        let mut tx = doc.transaction();
        tx.put(ROOT, "v", 1).unwrap();
        let m = tx.put_object(ROOT, "m", ObjType::Map).unwrap();
        tx.put(&m, "k", 2).unwrap();
        tx.insert(&list, 0, "x").unwrap();
        tx.commit();
        let c = doc.get_last_local_change().unwrap();
        let start = c.start_op().get();
        (c, start)
    }

    #[test]
    fn reads_the_objects_a_change_touches_and_makes() {
        let (c, start) = sample();
        let found = read(&c).unwrap();
        // The map is the change's second op; the list is op 1 of its other actor (index 1).
        assert_eq!(found.made, vec![start + 1]);
        let mut expected = vec![(start + 1, 0), (1, 1)];
        expected.sort_unstable();
        assert_eq!(found.touched, expected);
    }

    #[test]
    fn any_damage_to_the_bytes_is_an_error_or_a_reading_never_a_panic() {
        let (c, _) = sample();
        let bytes = c.raw_bytes().to_vec();
        for i in 0..bytes.len() {
            for flip in [0xffu8, 0x80, 0x01, 0x7f] {
                let mut damaged = bytes.clone();
                damaged[i] ^= flip;
                if let Ok(cols) = columns(&damaged) {
                    for (spec, data) in cols {
                        let _ = rle(data, 64);
                        let _ = actor_indexes_below(data, (spec % 5) as usize);
                    }
                }
            }
            let _ = columns(&bytes[..i]);
        }
        // Runs longer than the change: refused, not allocated.
        assert!(rle(&[0x3f, 0x01], 3).is_err());
        assert!(rle(&[0x00, 0xff, 0xff, 0xff, 0xff, 0x0f], 3).is_err());
        assert_eq!(
            rle(&[0x02, 0x05, 0x00, 0x01], 3).unwrap(),
            vec![Some(5), Some(5), None]
        );
        assert_eq!(rle(&[0x7e, 0x01, 0x02], 2).unwrap(), vec![Some(1), Some(2)]);
        assert!(actor_indexes_below(&[0x7f, 0x03], 3).is_err());
        assert!(actor_indexes_below(&[0x7f, 0x02], 3).is_ok());
    }
}
